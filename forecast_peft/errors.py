"""Errors a user can cause. The CLI prints them as one line instead of a traceback."""

import errno
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class UserError(Exception):
    """A problem with the user's input (path, file, option, checkpoint); exit code 1."""

    exit_code = 1


class ConfigError(UserError):
    """An unknown option, config key or malformed override; exit code 2 like a usage error."""

    exit_code = 2


class CompileError(UserError):
    """torch.compile could not compile the network, or its compiled code failed (a bug of
    torch's, as a rule): one line that says so and how to run uncompiled; exit code 1. Its cause
    is torch's own error, whose traceback the CLI writes to a file for a bug report."""


def traceback_file(err: BaseException) -> str | None:
    """Write ``err``'s traceback (its causes included) to a file in the system's temporary folder;
    its path, or None where it could not be written."""
    import os
    import tempfile
    import traceback

    path = os.path.join(tempfile.gettempdir(), f"fpeft-traceback-{os.getpid()}.txt")
    try:
        with open(path, "w") as out:
            out.write("".join(traceback.format_exception(err)))
    except OSError:
        return None
    return path


class Terminated(Exception):
    """The process was told to stop (SIGTERM: a scheduler's time limit, ``kill``); exit code 143.
    Not a UserError: a sweep stops with it rather than going on to its next run."""

    exit_code = 143


class StorageError(Exception):
    """A training run found no room to go on: the file system refused a write (a full disk, a
    permission), the DataLoader workers found no shared memory, or a process of a ddp_spawn run was
    ended by a signal (the out-of-memory killer's SIGKILL, say), or another process of a
    multi-process run stopped (on one of these, as a rule). The run stops with the way to
    resume it; exit code 1. Not a UserError: a sweep stops with it rather than going on to runs
    that would meet the same machine."""

    exit_code = 1


class WorkerError(UserError):
    """A problem met in a DataLoader worker, in a line. The DataLoader raises it again in the main
    process as ``type(err)(text)``, with the worker's traceback in front of the message: this
    keeps only the message."""

    def __init__(self, message: str):
        super().__init__(message.rstrip().splitlines()[-1].split(f"{type(self).__name__}: ", 1)[-1])


class SharedMemoryError(WorkerError):
    """DataLoader workers could not allocate shared memory for a batch (a container's small
    /dev/shm)."""


class CacheChangedError(WorkerError):
    """A DataLoader worker started by forkserver or spawn found a cache shard that was written again
    (or removed) after the run had opened it: it would have read other scenes than the run's."""


def os_error_line(err: OSError, then: str = "") -> str:
    """The file system's refusal in a line, followed by ``then`` (what to do next, such as how to
    resume a run). A full disk names the file it was writing (an atomic write's temporary file is
    ``filename``, the file meant is ``filename2``) and what to do."""
    if err.errno != errno.ENOSPC:
        said = _refusal(err)
        return f"{said}; {then}" if then else said
    where = err.filename2 or err.filename
    writing = f" writing {where}" if where else ""
    advice = "free some space, or write to a larger disk"
    return f"no space left on the device{writing}: {advice}" + (f"; {then}" if then else ", and run again")


def _refusal(err: OSError) -> str:
    """``PATH: what the system said`` (``[Errno 1] Operation not permitted: 'PATH'`` as Python
    words it), or Python's words where the error names no file."""
    if err.filename is None or not err.strerror:
        return str(err)
    target = f" -> {err.filename2}" if err.filename2 else ""
    return f"{err.filename}{target}: {err.strerror[:1].lower()}{err.strerror[1:]}"


def out_of_memory_line(err: BaseException, advice: str) -> str:
    """CUDA's out-of-memory error (a paragraph) in a line: what the allocation wanted, what the
    GPU had free, and ``advice``: which setting to lower."""
    text = " ".join(str(err).split())
    size = r"[\d.]+ [KMGT]?i?B"
    wanted = re.search(rf"Tried to allocate ({size})", text)
    room = re.search(rf"GPU (\d+) has a total capacity of ({size}) of which ({size}) is free", text)
    parts = ([f"tried to allocate {wanted[1]}"] if wanted else []) + (
        [f"GPU {room[1]} had {room[3]} free of {room[2]}"] if room else []
    )
    detail = f" ({'; '.join(parts)})" if parts else ""
    return f"out of GPU memory{detail}: {advice}"


@contextmanager
def gpu_memory_advice(advice: str) -> Iterator[None]:
    """CUDA's out-of-memory error inside the block becomes a UserError of one line
    (``out_of_memory_line``)."""
    import torch

    try:
        yield
    except torch.cuda.OutOfMemoryError as err:
        raise UserError(out_of_memory_line(err, advice)) from None


def count(n: int, noun: str) -> str:
    """``1 scenario``, ``2 scenarios``: a count for a message to the user."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def first_of(names: list[str]) -> str:
    """``a``, ``a and 1 other``, ``a and 2 others``: the first of several names, for a message."""
    return names[0] + (f" and {count(len(names) - 1, 'other')}" if len(names) > 1 else "")


def require_checkpoint(path) -> None:
    """A checkpoint (or run directory, or adapter export) ``path`` that does not exist: one line."""
    if not Path(path).exists():
        raise UserError(f"checkpoint {path} does not exist")
