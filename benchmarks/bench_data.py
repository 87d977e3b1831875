"""Data-path speed on the CPU: feature extraction per scenario (one core), the packed cache's
batch rate through the DataLoader, cache bytes per scene, synthetic scenarios per second, how
fast one process builds batches of 128 AV2-sized scenes (what one DataLoader worker can feed
a GPU), the time per scene of `fpeft eval`'s baselines, and how long a run's DataLoader workers
take to bring their first batch, by the way they start (``data.worker_start``), the
seconds `fpeft viz` takes per picture, and how fast `fpeft convert` cuts a long drive into scenarios.

    python -m benchmarks.bench_data --sample ../shared/av2_sample --out benchmarks/results/data_cpu.json
    python -m benchmarks.bench_data --only convert --out benchmarks/results/convert_cpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from benchmarks.machine import cpu_name


def bench_extract(sample: Path, repeats: int) -> dict:
    from forecast_peft.data.av2_reader import extract

    scenario = next(p for p in (sample / "val").iterdir() if p.is_dir())
    extract(scenario)
    gc.freeze()  # as the preprocessing workers do after their imports
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        extract(scenario)
        times.append((time.perf_counter() - start) * 1e3)
    return {
        "extract_ms_median": round(statistics.median(times), 2),
        "extract_ms_min": round(min(times), 2),
        "repeats": repeats,
    }


def bench_loader(root: Path, workers: int, batch: int, epochs: int, start: str = "auto") -> dict:
    """Scenes per second out of a shuffled loader of ``workers`` workers started by ``start``
    (``data.worker_start``), once they run."""
    import torch
    from torch.utils.data import DataLoader

    from forecast_peft.data.batch import keep_batch
    from forecast_peft.data.datamodule import worker_context
    from forecast_peft.data.dataset import ForecastDataset

    ds = ForecastDataset(root / "cache", "train")
    loader = DataLoader(
        ds,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        collate_fn=keep_batch,
        persistent_workers=workers > 0,
        multiprocessing_context=worker_context(SimpleNamespace(worker_start=start)),
    )
    for _ in loader:  # warm: workers started, pages cached
        pass

    def rate(read: bool) -> float:
        start = time.perf_counter()
        scenes = 0
        for _ in range(epochs):
            for b in loader:
                scenes += b["x"].shape[0]
                if read:  # touch every byte in the consumer, as a host-to-device copy would
                    for v in b.values():
                        if isinstance(v, torch.Tensor):
                            v.view(-1).view(torch.uint8).max()
        return round(scenes / (time.perf_counter() - start), 1)

    delivered = rate(read=False)
    read = rate(read=True)
    size = sum(f.stat().st_size for f in (root / "cache" / "train").rglob("*") if f.is_file())
    return {
        "loader_scenes_per_s": delivered,
        "loader_scenes_per_s_consumer_reads_all": read,
        "loader_workers": workers,
        "batch": batch,
        "cache_bytes_per_scene": round(size / len(ds)),
        "torch_threads": torch.get_num_threads(),
    }


def bench_batch_building(root: Path, scenes: int, batch: int, repeats: int = 3) -> dict:
    """Scenes per second that one process turns into padded batches of ``batch`` AV2-sized random
    scenes (20-64 actors, 60-200 lanes), read from the packed cache as a DataLoader worker does,
    in random order (training) and in size order (evaluation); best of ``repeats`` passes."""
    import numpy as np

    from benchmarks.e2e_epoch import build_cache
    from forecast_peft.data.dataset import ForecastDataset, size_order

    build_cache(root, scenes)
    ds = ForecastDataset(root, "train")
    actors, lanes = ds.scene_sizes()
    orders = {"random": np.random.default_rng(0).permutation(len(ds)), "size": size_order(actors, lanes, batch)}
    result = {}
    for name, order in orders.items():
        best = 0.0
        for _ in range(repeats):
            start = time.perf_counter()
            for i in range(0, len(order), batch):
                ds.__getitems__(order[i : i + batch].tolist())
            best = max(best, len(order) / (time.perf_counter() - start))
        result[f"batch{batch}_av2_sized_scenes_per_s_one_process_{name}"] = round(best, 1)
    return result


def bench_eval_loop(batch: int = 128, batches: int = 40, repeats: int = 3) -> dict:
    """Scenes per second of `fpeft eval`'s loop around the network (``evaluate``: the transfer,
    the metrics, the per-scene values, the report rows) with the constant-velocity predictor, over
    batches of ``batch`` AV2-sized random scenes already in memory; best of ``repeats`` passes.
    At 10,000 scenes/s a batch of 128 has 12.8 ms in all."""
    import torch

    from benchmarks.scenes import random_batch
    from forecast_peft.evaluation import constant_velocity, evaluate

    pool = [random_batch(batch, seed=s) for s in range(4)]
    loader = [pool[i % len(pool)] for i in range(batches)]
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        evaluate("cv", constant_velocity, loader, torch.device("cpu"), progress=False)
        best = max(best, batch * batches / (time.perf_counter() - start))
    return {
        f"eval_loop_batch{batch}_scenes_per_s_cpu_predictor": round(best, 1),
        f"eval_loop_batch{batch}_ms_per_batch": round(1e3 * batch / best, 2),
    }


def bench_pictures(folder: Path, pictures: int = 8) -> dict:
    """Seconds per picture of `fpeft viz` (``viz.draw_scene``): AV2-sized random scenes (20-64
    actors, 60-200 lanes), two panels of six modes each (two checkpoints side by side), written
    as PNG; the median of ``pictures`` after one to warm up."""
    import torch

    from benchmarks.scenes import random_batch
    from forecast_peft.viz import draw_scene

    batch = random_batch(pictures + 1, seed=0)
    g = torch.Generator().manual_seed(0)
    forecasts = [(name, torch.randn(6, 60, 2, generator=g).cumsum(1), torch.randn(6, generator=g)) for name in "ab"]
    times = []
    for i in range(pictures + 1):
        start = time.perf_counter()
        draw_scene(batch, i, forecasts, folder / f"{i}.png")
        times.append(time.perf_counter() - start)
    lanes = (~batch["lane_key_padding_mask"]).sum(1).float().mean()
    return {
        "viz_s_per_picture_two_panels": round(statistics.median(times[1:]), 3),
        "viz_lanes_mean": round(float(lanes)),
    }


def bench_baselines(cache: Path, batch: int = 32) -> dict:
    """Milliseconds per scene of each of `fpeft eval`'s baselines, on the synthetic scenes of
    ``cache`` (lanes that continue each other as AV2's do) and on AV2-sized random scenes (random
    lanes, of which few continue each other): lane_following walks the lanes on the host."""
    from benchmarks.scenes import random_batch
    from forecast_peft.data.dataset import ForecastDataset
    from forecast_peft.evaluation import BASELINES

    scenes = ForecastDataset(cache, "train")
    sets = {
        "synth": [
            scenes.__getitems__(list(range(i, min(len(scenes), i + batch)))) for i in range(0, len(scenes), batch)
        ],
        "av2_sized_random": [random_batch(batch, seed=s) for s in range(8)],
    }
    result = {}
    for name, predict in BASELINES.items():
        predict(sets["synth"][0])  # imports on the first call, outside the timing
        for label, batches in sets.items():
            start = time.perf_counter()
            for b in batches:
                predict(b)
            seconds = time.perf_counter() - start
            result[f"baseline_{name}_ms_per_scene_{label}"] = round(
                1e3 * seconds / sum(len(b["x"]) for b in batches), 3
            )
    return result


def bench_synth(out: Path, num: int, style: str) -> dict:
    from forecast_peft.data.synth.generate import generate, make_scenario

    make_scenario(0, "train", style, 0)  # compile the simulation kernel outside the timing
    start = time.perf_counter()
    generate(out, "train", num, seed=123, style=style, workers=1, progress=False)
    return {f"synth_{style}_scenarios_per_s": round(num / (time.perf_counter() - start), 1)}


def grid_drive(folder: Path, minutes: float, alive: int, seed: int = 0) -> tuple[Path, Path, int]:
    """A drive to convert: a grid of two-way streets 100 m apart (GeoJSON lanes, one per block
    side and way) and ``alive`` vehicles at a time, each driving one street for 60 s at 5-15
    m/s without leaving the grid, sampled at 10 Hz with a few milliseconds of jitter. Returns
    the tracks CSV, the map and the number of rows."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    size, block = 2000.0, 100.0
    features, lane_id = [], 1
    for axis in (0, 1):
        for c in np.arange(0.0, size + 1, block):
            for way in (-1.75, 1.75):
                for a in np.arange(0.0, size, block):
                    ends = [[a, c + way], [a + block, c + way]] if axis == 0 else [[c + way, a], [c + way, a + block]]
                    features.append(
                        {"type": "Feature", "id": lane_id, "geometry": {"type": "LineString", "coordinates": ends}}
                    )
                    lane_id += 1
    map_file = folder / "streets.geojson"
    map_file.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    steps = int(minutes * 600)
    life = 600
    count = alive * steps // life
    start = rng.integers(-life, steps, count)
    street = rng.integers(0, 21, count) * block + rng.choice([-1.75, 1.75], count)
    speed = rng.uniform(5, 15, count) * rng.choice([-1, 1], count)
    reach = 15.0 * life / 10  # the farthest a vehicle drives: it starts where its street goes on that far
    along = np.where(speed > 0, rng.uniform(0, size - reach, count), rng.uniform(reach, size, count))
    horizontal = rng.random(count) < 0.5
    frames = []
    for i in range(count):
        k = np.arange(max(start[i], 0), min(start[i] + life, steps))
        s = along[i] + speed[i] * (k - start[i]) / 10
        xy = (
            np.stack([s, np.full(len(k), street[i])], -1)
            if horizontal[i]
            else np.stack([np.full(len(k), street[i]), s], -1)
        )
        frames.append(
            pd.DataFrame(
                {"track_id": i, "time_s": k / 10 + rng.uniform(-0.003, 0.003, len(k)), "x": xy[:, 0], "y": xy[:, 1]}
            )
        )
    table = pd.concat(frames)
    tracks = folder / "drive.csv"
    table.to_csv(tracks, index=False)
    return tracks, map_file, len(table)


def bench_convert(folder: Path, minutes: float = 10.0, alive: int = 120) -> dict:
    """`fpeft convert` on a drive of ``minutes`` (``grid_drive``): back-to-back windows with one
    scenario each, then windows every 2 s with 6 each, with 2 writing threads (the default) and
    with 1, and with the focal agents picked by each other ``convert.focal_by`` than travel, into
    fresh folders."""
    from forecast_peft.data.convert import FOCAL_SCORES, convert

    folder.mkdir(parents=True, exist_ok=True)
    tracks, map_file, rows = grid_drive(folder, minutes, alive)
    lanes = len(json.loads(map_file.read_text())["features"])
    out = {"convert_drive_minutes": minutes, "convert_drive_rows": rows, "convert_map_lanes": lanes}
    runs = [("back_to_back", 11.0, 1, 2, "travel"), ("every_2s_6_focal", 2.0, 6, 2, "travel")]
    runs += [("every_2s_6_focal_1_writer", 2.0, 6, 1, "travel")]
    runs += [(f"every_2s_6_focal_by_{by}", 2.0, 6, 2, by) for by in FOCAL_SCORES if by != "travel"]
    for name, stride, focal, workers, by in runs:
        start = time.perf_counter()
        counts = convert(
            [tracks],
            map_file,
            folder / name,
            stride_s=stride,
            focal_per_window=focal,
            focal_by=by,
            workers=workers,
            progress=False,
        )
        secs = time.perf_counter() - start
        out[f"convert_{name}_scenarios"] = counts["written"]
        out[f"convert_{name}_s"] = round(secs, 2)
        out[f"convert_{name}_scenarios_per_s"] = round(counts["written"] / secs, 1)
    return out


WORKER_STARTS = ("fork", "forkserver", "spawn")


def first_batches(cache: Path, start: str, workers: int) -> dict:
    """In this process: seconds from making fpeft's shuffled training loader to its first batch,
    then the same for a second loader of the split (the validation loader's turn; a fork
    server is then running), with ``workers`` workers started by ``start``."""
    from forecast_peft.data.datamodule import ForecastDataModule

    settings = dict(cache_dir=str(cache), train_fraction=1.0, subset_seed=0, batch_size=32, eval_batch_size=32)
    settings.update(num_workers=workers, pin_memory=False, shuffle=True, worker_start=start)
    module = ForecastDataModule(SimpleNamespace(**settings))
    times = []
    for shuffle in (True, False):
        began = time.perf_counter()
        next(iter(module.loader("train", shuffle=shuffle)))
        times.append(time.perf_counter() - began)
    return {"first_loader_s": times[0], "second_loader_s": times[1]}


def bench_worker_start(cache: Path, workers: int = 2, repeats: int = 3) -> dict:
    """What each way of starting DataLoader workers (``data.worker_start``) costs a run: the
    median of ``repeats`` fresh processes, which import ``forecast_peft.cli`` first as the
    ``fpeft`` command does (forkserver and spawn workers import the main script again)."""
    result = {}
    for start in WORKER_STARTS:
        runs = []
        for _ in range(repeats):
            probe = [
                sys.executable,
                "-m",
                "benchmarks.bench_data",
                "--probe-worker-start",
                start,
                "--cache",
                str(cache),
            ]
            done = subprocess.run(probe, capture_output=True, text=True, check=True)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        for key in ("first_loader_s", "second_loader_s"):
            result[f"worker_start_{start}_{key}"] = round(statistics.median(r[key] for r in runs), 3)
    result["worker_start_workers"] = workers
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--probe-worker-start", choices=WORKER_STARTS, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--sample", type=Path, default=Path("../shared/av2_sample"))
    parser.add_argument("--scenes", type=int, default=400, help="synthetic scenes for the loader and synth rates")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--only", choices=["convert"], help="only this part (convert: fpeft convert on a long drive)")
    args = parser.parse_args()
    if args.probe_worker_start:  # one process of bench_worker_start
        import forecast_peft.cli  # noqa: F401  (as the fpeft command starts)

        print(json.dumps(first_batches(args.cache, args.probe_worker_start, workers=2)))
        return
    if args.out is None:
        parser.error("--out is required")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = {"cpu": cpu_name(), "cpu_count": os.cpu_count()}
    tmp = Path(tempfile.mkdtemp(prefix="fpeft-bench-"))
    if args.only == "convert":
        try:
            result.update(bench_convert(tmp / "convert"))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _write(result, args.out)
        return
    result.update(bench_extract(args.sample, repeats=200))
    try:
        for style in ("suburban", "downtown"):
            result.update(bench_synth(tmp / style, args.scenes // 2, style))
        from forecast_peft.data.preprocess import preprocess

        root = tmp / "mixed"
        (root / "train").mkdir(parents=True)
        for style in ("suburban", "downtown"):
            for d in (tmp / style / "train").iterdir():
                shutil.move(str(d), root / "train" / d.name)
        start = time.perf_counter()
        preprocess(root, root / "cache", ["train"], workers=2, progress=False)
        result["preprocess_scenarios_per_s_2_workers"] = round(args.scenes / (time.perf_counter() - start), 1)
        result.update(bench_loader(root, workers=2, batch=32, epochs=25))  # as fpeft's loaders
        forked = bench_loader(root, workers=2, batch=32, epochs=25, start="fork")
        for key in ("loader_scenes_per_s", "loader_scenes_per_s_consumer_reads_all"):
            result[f"{key}_forked_workers"] = forked[key]
        result.update(bench_worker_start(root / "cache"))
        result.update(bench_baselines(root / "cache"))
        result.update(bench_batch_building(tmp / "av2_sized", scenes=4096, batch=128))
        result.update(bench_eval_loop())
        result.update(bench_pictures(tmp / "pictures"))
        result.update(bench_convert(tmp / "convert"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _write(result, args.out)


def _write(result: dict, out: Path) -> None:
    print(json.dumps(result, indent=1))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
