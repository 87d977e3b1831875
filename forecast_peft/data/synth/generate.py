"""`fpeft synth`: many scenarios, in parallel, deterministic for a seed, resumable."""

from __future__ import annotations

import multiprocessing as mp
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa

from forecast_peft.constants import SPLITS, TOTAL_STEPS
from forecast_peft.data import check_split
from forecast_peft.data.av2_format import scenario_written
from forecast_peft.data.synth.roadnet import build_roadnet
from forecast_peft.data.synth.sim import lane_geometry, simulate
from forecast_peft.data.synth.styles import STYLES, get_style
from forecast_peft.data.synth.writer import CITIES, NoFocalError, build_scenario, write_scenario
from forecast_peft.errors import UserError, count
from forecast_peft.runtime import progress_bar, refuse_unguarded_script
from forecast_peft.slurm import requeue_signal_blocked

MAX_TRIES = 20


def scenario_rng(seed: int, split: str, style: str, index: int) -> np.random.Generator:
    """Independent stream per scenario: the same files whatever the number of workers."""
    return np.random.default_rng([seed, SPLITS.index(split), list(STYLES).index(style), index])


def scenario_id(seed: int, split: str, style: str, index: int) -> str:
    """Known before simulating, so that a re-run can skip scenarios already written."""
    rng = np.random.default_rng([seed, SPLITS.index(split), list(STYLES).index(style), index, 1])
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def make_scenario(seed: int, split: str, style_name: str, index: int) -> tuple[pa.Table, dict]:
    style = get_style(style_name)
    rng = scenario_rng(seed, split, style_name, index)
    city = CITIES[int(rng.integers(len(CITIES)))]
    sid = scenario_id(seed, split, style_name, index)
    for _ in range(MAX_TRIES):
        net = build_roadnet(rng, style)
        tracks = simulate(net, lane_geometry(net, style.lat_accel), style, rng, TOTAL_STEPS)
        try:
            return build_scenario(net, tracks, rng, split, city, sid)
        except NoFocalError:
            continue
    raise RuntimeError(f"no usable scenario after {MAX_TRIES} tries (seed {seed}, index {index})")


def _job(args: tuple) -> tuple[str, bool]:
    """Write one scenario unless it is already there; returns its directory and whether it was written."""
    out, seed, split, style, index = args
    final = Path(out) / split / scenario_id(seed, split, style, index)
    if scenario_written(final):
        return str(final), False
    table, map_data = make_scenario(seed, split, style, index)
    return str(write_scenario(Path(out) / split, table, map_data)), True


def generate(
    out: str | Path, split: str, num: int, seed: int, style: str, workers: int = 1, progress: bool = True
) -> list[str]:
    """Write ``num`` scenarios to ``out/split``; returns their directories."""
    check_split(split)
    get_style(style)
    if num < 1:
        raise UserError(f"--num-scenarios must be at least 1, got {num}")
    if workers > 1:  # before any work
        refuse_unguarded_script("scenario generator's processes", "generate in one process (workers=1)")
    (Path(out) / split).mkdir(parents=True, exist_ok=True)
    jobs = [(str(out), seed, split, style, i) for i in range(num)]
    start = time.perf_counter()
    bar = progress_bar(total=num, desc=f"synth {style} {split}", unit="scn", disable=not progress)
    done, written = [], 0
    pool = None
    if workers > 1:
        with requeue_signal_blocked():  # the pool is not the main process, which acts on it
            pool = mp.get_context("spawn").Pool(workers)
    try:
        for path, new in pool.imap(_job, jobs, chunksize=4) if pool else map(_job, jobs):
            done.append(path)
            written += new
            bar.update(1)
    finally:
        bar.close()
        if pool:
            pool.terminate()
    if progress:
        secs = time.perf_counter() - start
        print(
            f"{style} {split}: wrote {count(written, 'scenario')}, {num - written} already present, to "
            f"{Path(out) / split} in {secs:.1f} s ({written / secs:.1f}/s)"
        )
    return done
