"""`fpeft preprocess`: raw AV2 scenarios to the packed cache, in parallel, resumable."""

from __future__ import annotations

import errno
import gc
import multiprocessing as mp
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from forecast_peft.data.cache import (
    FORMAT_VERSION,
    INDEX_FILE,
    LOCK_FILE,
    REPORT_FILE,
    DamagedShard,
    completed_shards,
    read_shard_meta,
    read_skipped,
    write_shard,
)
from forecast_peft.data.files import write_json_atomic
from forecast_peft.errors import UserError, count
from forecast_peft.runtime import progress_bar, refuse_unguarded_script
from forecast_peft.slurm import requeue_signal_blocked


@dataclass
class SplitSummary:
    split: str
    total: int = 0
    read: int = 0
    written: int = 0
    already_cached: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    stray_files: list[str] = field(default_factory=list)  # files in the split folder, outside scenario folders
    seconds: float = 0.0

    def line(self) -> str:
        return (
            f"{self.split}: {count(self.total, 'scenario')}, read {self.read}, written {self.written}, "
            f"already cached {self.already_cached}, skipped {len(self.skipped)}, {self.seconds:.1f} s"
        )


def _worker_init() -> None:
    """Import the reader once and freeze the objects that exist by then: the garbage collector
    then skips the libraries' many long-lived objects while scenarios are read."""
    import forecast_peft.data.av2_reader  # noqa: F401

    gc.freeze()


def _read_one(job: tuple[str, str]) -> tuple[str, dict | None, str]:
    from forecast_peft.data.av2_reader import failure_reason, read_local_scene

    path, split = job
    try:
        return path, read_local_scene(path, split), ""
    except Exception as err:  # a batch job reports what it cannot read and goes on
        return path, None, failure_reason(err)


def scenario_dirs(split_dir: Path, files: list[str] | None = None) -> list[str]:
    """The scenario folders of a split, sorted: paths as strings (AV2's train split has 200k;
    no stat per entry and no Path objects). Hidden folders (``.ipynb_checkpoints``) are none.
    The names of the files beside them (no scenario: one's files unpacked without its folder)
    go into ``files`` where given."""
    dirs = []
    with os.scandir(split_dir) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                dirs.append(entry.path)
            elif files is not None:
                files.append(entry.name)
    return sorted(dirs)


def cached_scenarios(split_dir: Path) -> tuple[dict[str, list[str]], list[DamagedShard]]:
    """The scenario directories each sound shard of ``split_dir`` holds ({shard name: [source]}),
    and the shards found damaged (a file missing or cut short), which hold none."""
    sound, damaged = {}, []
    for shard in completed_shards(split_dir):
        try:
            sound[shard.name] = read_shard_meta(shard)["source"]
        except DamagedShard as err:
            damaged.append(err)
    return sound, damaged


def preprocess_split(
    root: Path, cache_dir: Path, split: str, workers: int = 1, shard_size: int = 512, progress: bool = True
) -> SplitSummary:
    """Cache every scenario of ``root/split`` not cached yet; returns what happened."""
    start = time.perf_counter()
    summary = SplitSummary(split)
    split_dir = cache_dir / split
    split_dir.mkdir(parents=True, exist_ok=True)
    for left in split_dir.glob(".tmp-*"):  # what a killed run was writing (one process at a time writes here)
        if left.is_dir():
            shutil.rmtree(left)
        else:
            left.unlink()
    sources = scenario_dirs(root / split, summary.stray_files)
    summary.total = len(sources)
    cached, damaged = cached_scenarios(split_dir)
    present = {os.path.basename(source) for source in sources}
    for err in damaged:  # its scenarios are not cached: those under the data root are read again below
        gone = [s for s in err.sources or [] if os.path.basename(s) not in present]
        lost = (
            f"; not there any more, so gone from the cache: {count(len(gone), 'scenario')} ({gone[0]}...)"
            if gone
            else ""
        )
        print(f"{err}: removed, and its scenarios are cached again from {root / split}{lost}")
        shutil.rmtree(err.path)
    counts = {name: len(shard_sources) for name, shard_sources in cached.items()}  # for the index
    # by directory name (the scenario id), so that a data root that moved is not cached twice
    done = {os.path.basename(source) for shard_sources in cached.values() for source in shard_sources}
    todo = [s for s in sources if os.path.basename(s) not in done]
    summary.already_cached = len(sources) - len(todo)
    index_path = split_dir / INDEX_FILE
    if (todo or damaged) and index_path.exists():
        index_path.unlink()  # until this run finishes, the split does not read as complete
    next_id = 1 + max((int(name.split("-")[1]) for name in cached), default=-1)
    pending: list[tuple[str, dict]] = []

    def flush() -> None:
        nonlocal next_id
        if pending:
            name = f"shard-{next_id:05d}"
            write_shard(split_dir, name, [s for _, s in pending], [p for p, _ in pending])
            counts[name] = len(pending)
            summary.written += len(pending)
            next_id += 1
            pending.clear()

    jobs = [(s, split) for s in todo]
    bar = progress_bar(total=len(jobs), desc=f"preprocess {split}", unit="scn", disable=not progress or not jobs)
    pool = None
    if workers > 1 and len(jobs) > 1:
        refuse_unguarded_script("preprocessing processes", "preprocess in one process (data.preprocess_workers=1)")
        with requeue_signal_blocked():  # the pool is not the main process, which acts on it
            pool = mp.get_context("spawn").Pool(workers, initializer=_worker_init)
    if pool is None:
        _worker_init()
    try:
        results = pool.imap(_read_one, jobs, chunksize=8) if pool else map(_read_one, jobs)
        for path, scene, reason in results:
            summary.read += 1
            bar.update(1)
            if scene is None:
                summary.skipped.append((path, reason))
                tqdm.write(f"skipped {path}: {reason}", file=sys.stderr)
                continue
            pending.append((path, scene))
            if len(pending) >= shard_size:
                flush()
        flush()
    finally:
        bar.close()
        if pool:
            pool.terminate()
        else:  # the caller's process goes on: its objects become collectable again
            gc.unfreeze()
    write_json_atomic(split_dir / REPORT_FILE, {"skipped": [{"path": p, "reason": r} for p, r in summary.skipped]})
    names = sorted(counts)
    index = {"version": FORMAT_VERSION, "split": split, "shards": names, "num_scenes": sum(counts.values())}
    write_json_atomic(index_path, index)
    summary.seconds = time.perf_counter() - start
    return summary


@contextmanager
def cache_lock(cache_dir: Path):
    """Hold ``cache_dir``'s lock file: one process at a time changes the cache (the processes of
    a multi-GPU run start together). Where the file system has no locks, go on without."""
    import fcntl

    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock = open(cache_dir / LOCK_FILE, "a")  # closed below, which releases the lock
    except OSError as err:
        if err.errno not in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR):
            raise
        raise UserError(
            f"cannot write the cache {cache_dir} ({err.strerror}): set data.cache_dir= to a folder you can "
            "write (the data root may stay read-only)"
        ) from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process that is updating the cache {cache_dir}", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:  # e.g. a network file system mounted without locks
            pass
        yield  # closing the file releases the lock


def preprocess(
    root: str | Path, cache_dir: str | Path, splits, workers: int = 1, shard_size: int = 512, progress: bool = True
) -> list[SplitSummary]:
    """Cache every split of ``splits`` present under ``root``; print a summary per split."""
    root, cache_dir = Path(root), Path(cache_dir)
    present = present_splits(root, splits)
    with cache_lock(cache_dir):
        return _preprocess_splits(root, cache_dir, present, workers, shard_size, progress)


def present_splits(root: Path, splits) -> list[str]:
    """The splits of ``splits`` that the data root holds, or a one-line error if none."""
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise UserError(f"data root {root} {what}: point data.root at an AV2 download or run `fpeft synth`")
    present = [s for s in splits if (root / s).is_dir()]
    if not present:
        raise UserError(f"data root {root} has none of the splits {list(splits)}")
    return present


def _preprocess_splits(root: Path, cache_dir: Path, splits, workers: int, shard_size: int, progress: bool = True):
    """``preprocess`` under the cache's lock."""
    summaries = []
    for split in splits:
        summary = preprocess_split(root, cache_dir, split, workers, shard_size, progress)
        print(summary.line())
        for path, reason in summary.skipped:
            print(f"  skipped {path}: {reason}")
        if summary.stray_files:
            print(
                f"  not read: {count(len(summary.stray_files), 'file')} in {root / split} outside scenario folders "
                f"(such as {sorted(summary.stray_files)[0]}): AV2 keeps each scenario in a folder <id>/ with "
                "scenario_<id>.parquet and log_map_archive_<id>.json"
            )
        summaries.append(summary)
    return summaries


def stale_splits(root: Path, cache_dir: Path, splits, notes: bool = False) -> list[str]:
    """The splits of ``splits`` whose cache is missing or lacks scenarios added under the data
    root since (those that could not be read do not count: `fpeft preprocess` tries them again).
    ``notes``: say where the cache holds scenarios no longer under the data root."""
    stale = []
    for split in splits:
        split_dir = cache_dir / split
        if not (split_dir / INDEX_FILE).exists():
            stale.append(split)
            continue
        if not (root / split).is_dir():  # a cache without its data root is used as it is
            continue
        shards, damaged = cached_scenarios(split_dir)
        present = {os.path.basename(s) for s in scenario_dirs(root / split)}
        cached = {os.path.basename(s) for sources in shards.values() for s in sources}
        unreadable = {os.path.basename(s["path"]) for s in read_skipped(cache_dir, split)}
        if damaged or present - cached - unreadable:
            stale.append(split)
        gone = sorted(cached - present)
        if gone and notes:
            print(
                f"note: the cache {split_dir} holds {count(len(gone), 'scenario')} no longer under {root / split} "
                f"(such as {gone[0]}), and they are used; delete {split_dir} to cache the split afresh"
            )
    return stale


def ensure_cache(data_cfg, splits) -> None:
    """Bring the cache of each split up to date before a stage reads it: preprocess a split never
    cached, and scenarios added under the data root since it was cached. The processes of a
    multi-GPU run all call this at once: one does the work under the cache's lock, and the
    others, once they hold it, find nothing left to do."""
    root, cache_dir = Path(data_cfg.root), Path(data_cfg.cache_dir)
    stale = stale_splits(root, cache_dir, splits, notes=True)
    if not stale:
        return
    for split in stale:  # a missing split fails in one line before anything is written
        if not (root / split).is_dir():
            raise UserError(
                f"no {split} split: {root / split} does not exist and {cache_dir / split} holds no cache of it; "
                f"point data.root at an AV2 download or run `fpeft synth`"
            )
    with cache_lock(cache_dir):
        stale = stale_splits(root, cache_dir, splits)  # again: another process may have done it meanwhile
        if stale:
            _preprocess_splits(root, cache_dir, stale, data_cfg.preprocess_workers, data_cfg.shard_size)
