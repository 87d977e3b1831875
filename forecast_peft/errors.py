"""Errors a user can cause. The CLI prints them as one line instead of a traceback."""

import errno
import re
import signal
import sys
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


def ended_by(signal_name: str) -> str:
    """How a process that a signal ended is said: SIGKILL, which leaves no message, is as a rule the
    system's out-of-memory killer."""
    killed = " (as the system's out-of-memory killer ends a process)" if signal_name == "SIGKILL" else ""
    return f"was ended by {signal_name}{killed}"


# torch's words for a DataLoader worker that ended: where the worker is the process's own child, at
# once (its SIGCHLD handler), with the signal's description or the exit code; where it is not (a
# worker from the fork server), at the loader's next check, with neither
_WORKER_SIGNAL = re.compile(r"DataLoader worker \(pid (\d+)\) is killed by signal: (.+?)\.?$")
_WORKER_EXIT = re.compile(r"DataLoader worker \(pid (\d+)\) exited unexpectedly with exit code (-?\d+)")
_WORKER_GONE = re.compile(r"DataLoader worker \(pid\(s\) ([\d, ]+)\) exited unexpectedly$")


def lost_worker(err: BaseException) -> str | None:
    """A DataLoader worker's end, which torch raises as a RuntimeError of a paragraph (or, from the
    signal handler, in the middle of whatever ran), in a line: the worker, how it ended (the
    signal; the exit code), and what to do; None for any other error. Where torch's words name
    neither, the loader iterator in ``err``'s traceback has the worker's exit code."""
    if not isinstance(err, RuntimeError):
        return None
    lines = str(err).strip().splitlines()
    text = lines[0].strip() if lines else ""
    if match := _WORKER_SIGNAL.match(text):
        names = {signal.strsignal(s): s.name for s in signal.Signals}
        return _worker_line(match[1], names.get(match[2], match[2]), None)
    if match := _WORKER_EXIT.match(text):
        return _worker_line(match[1], *_signal_or_code(int(match[2])))
    if match := _WORKER_GONE.match(text):
        pid = match[1].split(",")[0].strip()
        code = _worker_exit_code(err, int(pid))
        return _worker_line(pid, *(_signal_or_code(code) if code is not None else (None, None)))
    return None


@contextmanager
def worker_ends_left_to_the_loader() -> Iterator[None]:
    """torch's SIGCHLD handler raises a DataLoader worker's end wherever the main process is; where
    Python cannot raise it (a fork's after-fork hook, a finaliser), Python printed it as
    "Exception ignored in ..." with a traceback (seen as a worker started while another was
    ended). Those are left out: the loader finds the worker gone at its next check, and the
    command says so in its line. Other unraisable errors go to the hook that was in place."""
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if lost_worker(unraisable.exc_value) is None:
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous


def _signal_or_code(code: int) -> tuple[str | None, int | None]:
    """A process's exit code as (the name of the signal that ended it, None) where negative, else
    (None, the code)."""
    if code < 0 and -code in signal.valid_signals():
        return signal.Signals(-code).name, None
    return None, code


# what a worker's own crash (an exit code, these signals) wants: its error shows where it runs
_CRASHED = "data.num_workers=0 reads the data in this process, where an error of its own shows"
_WORKER_ADVICE = {
    "SIGKILL": "fewer workers (data.num_workers) or smaller batches (data.batch_size) need less memory",
    # what a worker meets where shared memory runs out under a mapping
    "SIGBUS": "out of shared memory (/dev/shm), as a rule: give it more (docker --shm-size=2g) or use fewer workers",
    **dict.fromkeys(("SIGSEGV", "SIGABRT", "SIGFPE", "SIGILL"), _CRASHED),
}


def _worker_line(pid: str, signal_name: str | None, code: int | None) -> str:
    """The line of worker ``pid`` that a signal ended, or that exited with ``code`` (None: not
    known), with what to do; a signal sent from outside the run (SIGTERM to the worker alone,
    say) gets no advice."""
    if signal_name is not None:
        how, advice = ended_by(signal_name), _WORKER_ADVICE.get(signal_name)
    else:
        how, advice = ("ended" if code is None else f"exited with code {code}"), _CRASHED
    return f"DataLoader worker (pid {pid}) {how}" + (f": {advice}" if advice else "")


def _worker_exit_code(err: BaseException, pid: int) -> int | None:
    """The exit code of worker ``pid`` of the loader iterator (``self._workers``, processes) whose
    check raised ``err``; None where the traceback holds none."""
    for raiser in raisers(err):
        for worker in getattr(raiser, "_workers", None) or []:
            if getattr(worker, "pid", None) == pid:
                return getattr(worker, "exitcode", None)
    return None


def raisers(err: BaseException) -> Iterator[object]:
    """The objects whose methods ``err`` passed through, outermost first: each frame's ``self`` in
    its traceback (where torch keeps what it knew of the processes it waited on)."""
    import traceback

    for frame, _ in traceback.walk_tb(err.__traceback__):
        if "self" in frame.f_locals:
            yield frame.f_locals["self"]


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


def reason_of(err: BaseException, most: int | None = None) -> str:
    """The first line of ``err``'s message (at most ``most`` characters), or its type's name where
    it has none: the reason a one-line error gives for a library's long one."""
    lines = str(err).strip().splitlines()
    return lines[0][:most] if lines else type(err).__name__


def first_sentence(err: BaseException, most: int | None = None) -> str:
    """``reason_of(err)`` up to its first ". " (at most ``most`` characters): torch's file-reading
    errors go on from there with miniz's general advice ("This is an internal miniz error. If you
    are seeing this error, ...")."""
    return reason_of(err).split(". ")[0][:most]


def count(n: int, noun: str) -> str:
    """``1 scenario``, ``2 scenarios``: a count for a message to the user."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def list_text(values) -> str:
    """A list as an override gives it: ``[miami,austin]``."""
    return "[" + ",".join(map(str, values)) + "]"


def first_of(names: list[str]) -> str:
    """``a``, ``a and 1 other``, ``a and 2 others``: the first of several names, for a message."""
    return names[0] + (f" and {count(len(names) - 1, 'other')}" if len(names) > 1 else "")


def require_checkpoint(path) -> None:
    """A checkpoint (or run directory, or adapter export) ``path`` that does not exist: one line."""
    if not Path(path).exists():
        raise UserError(f"checkpoint {path} does not exist")
