"""Files and directories written whole, so that no reader sees half of one: the cache's shards
and index files, the synthetic scenarios."""

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
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
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


def write_json_atomic(path: Path, obj) -> None:
    """``obj`` as JSON at ``path``, by a rename of a temporary sibling written first."""
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)
