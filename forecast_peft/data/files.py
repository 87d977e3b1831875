"""Files and directories written whole, so that no reader sees half of one: the cache's shards
and index files, the synthetic scenarios, training checkpoints."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from forecast_peft.errors import UserError


@contextmanager
def atomic_directory(final: Path, what: str, hint: str) -> Iterator[Path]:
    """Yield a temporary sibling of ``final`` to write into, renamed to ``final`` once complete,
    so that no reader sees half of it. A write that fails (a full disk) removes the temporary
    directory and stops in one line that names ``final`` (as ``what``), the free space and ``hint``:
    what to do, and what of the work is kept."""
    tmp = temporary_sibling(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        yield tmp
    except OSError as err:  # numpy reports a short write without an errno: "N requested and M written"
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(final.parent).free / 1e6
        reason = err.strerror or str(err)
        raise UserError(f"cannot write {what} {final} ({reason}; {free:.1f} MB free there): {hint}") from None
    if final.exists():  # an incomplete earlier attempt, or a shard cached again
        shutil.rmtree(final)
    tmp.rename(final)


def temporary_sibling(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place: beside it, so that the rename
    stays on one file system and is atomic (``.tmp-*``, which preprocessing clears up)."""
    return path.with_name(f".tmp-{path.name}-{os.getpid()}")


def write_bytes_atomic(path: Path, data) -> None:
    """``data`` (bytes or a buffer) at ``path``, on disk (fsync) before a rename makes it
    ``path``. A write that fails (a full disk) removes its partial file, leaves any earlier
    ``path`` as it was, and raises an OSError whose ``filename2`` is ``path``."""
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:  # a full disk, Ctrl-C: no partial file stays behind
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise OSError(err.errno, err.strerror, str(tmp), None, str(path)) from None
        raise


def write_json_atomic(path: Path, obj) -> None:
    """``obj`` as JSON at ``path``, written whole (``write_bytes_atomic``)."""
    write_bytes_atomic(path, json.dumps(obj, indent=1).encode())
