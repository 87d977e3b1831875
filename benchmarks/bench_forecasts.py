"""How long `fpeft eval --forecasts FILE` takes to read a file of forecasts the size of a whole
AV2 split before it scores it: the AV2 validation split's 24,988 scenarios by default, 6 modes of
their focal track, written as `fpeft predict` writes them (av2's ``ChallengeSubmission`` parquet,
and the forecast table as ``.csv.gz``). Timed: reading and checking the file (``read_forecasts``),
the check that it covers the split (``check_coverage``), and turning every forecast into its
scene's focal frame (``file_predictor``, in batches of 128, as eval runs it); and reading the
file's scenario ids as `fpeft eval --scenarios FILE` does (``read_scenario_list``). One run each:
the file is written once, its reading timed ``--repeats`` times (the median).

    python -m benchmarks.bench_forecasts --out benchmarks/results/forecasts_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.machine import cpu_name

AV2_VAL_SCENARIOS = 24_988


def forecasts(n: int, seed: int = 0) -> dict[str, tuple[np.ndarray, dict[str, np.ndarray]]]:
    """``n`` scenarios' forecasts as ``ChallengeSubmission`` takes them: scenario_id ->
    (probabilities [6], {focal track id: trajectories [6, 60, 2]}), at AV2's city coordinates."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        start = rng.uniform(-3000, 3000, 2)
        steps = rng.normal(0, 1, (6, 60, 2)).cumsum(axis=1) + start
        p = rng.dirichlet(np.ones(6))
        out[f"{i:08x}-0000-4000-8000-{i:012x}"] = (p, {f"{i % 90_000 + 10_000}": steps})
    return out


def timed(call, repeats: int) -> tuple[float, object]:
    """The median seconds of ``repeats`` calls, and the last call's result."""
    seconds, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def bench_file(path: Path, scenarios: list[str], tracks: list[str], repeats: int) -> dict:
    import torch

    from forecast_peft.data.scenario_list import read_scenario_list
    from forecast_peft.forecast_files import check_coverage, file_predictor, read_forecasts

    read_s, found = timed(lambda: read_forecasts(path), repeats)
    coverage_s, _ = timed(lambda: check_coverage(found, scenarios, tracks, "val"), repeats)
    predict = file_predictor(found)
    rng = np.random.default_rng(1)
    batches = []
    for start in range(0, len(scenarios), 128):
        size = len(scenarios[start : start + 128])
        origin = torch.from_numpy(rng.uniform(-3000, 3000, (size, 2))).float()
        theta = torch.from_numpy(rng.uniform(-np.pi, np.pi, size)).float()
        ids = slice(start, start + size)
        batches.append({"scenario_id": scenarios[ids], "track_id": tracks[ids], "origin": origin, "theta": theta})
    frame_s, _ = timed(lambda: [predict(batch) for batch in batches], repeats)
    list_s, listed = timed(lambda: read_scenario_list(path), repeats)
    assert listed.ids == set(scenarios), f"{path.name}: --scenarios read {len(listed.ids)} ids"
    return {
        "file_mb": round(path.stat().st_size / 2**20, 1),
        "rows": len(found.rows),
        "read_s": round(read_s, 3),
        "coverage_s": round(coverage_s, 3),
        "focal_frame_s": round(frame_s, 3),
        "total_s": round(read_s + coverage_s + frame_s, 3),
        "scenario_list_s": round(list_s, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", type=int, default=AV2_VAL_SCENARIOS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from av2.datasets.motion_forecasting.eval.submission import ChallengeSubmission

    from forecast_peft.forecast_files import forecast_table, write_table

    predictions = forecasts(args.scenarios)
    scenarios = list(predictions)
    tracks = [next(iter(tracks)) for _, tracks in predictions.values()]
    result = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "scenarios": args.scenarios, "repeats": args.repeats}
    with tempfile.TemporaryDirectory() as scratch:
        submission, table = Path(scratch) / "val.parquet", Path(scratch) / "val.csv.gz"
        start = time.perf_counter()
        ChallengeSubmission(predictions).to_parquet(submission)
        result["write_submission_s"] = round(time.perf_counter() - start, 3)
        start = time.perf_counter()
        write_table(forecast_table(predictions), table)
        result["write_table_s"] = round(time.perf_counter() - start, 3)
        for name, path in (("submission", submission), ("table", table)):
            result[name] = bench_file(path, scenarios, tracks, args.repeats)
            print(json.dumps({name: result[name]}), flush=True)
    result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    print(json.dumps({k: v for k, v in result.items() if k not in ("submission", "table")}))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
