"""`fpeft deploy`'s files against the network they come from: the seconds to export and to compile
with AOTInductor, and milliseconds per batch of random AV2-sized scenes (``deploy.example_inputs``)
for the eager network (adapters folded, as `fpeft eval` runs it), the exported program and the
AOTInductor package. Random weights of a model size (the timings do not depend on the values).

    python -m benchmarks.bench_deploy --model forecast_mae --out benchmarks/results/deploy_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf


def _ms_per_call(fn, inputs, repeats: int) -> float:
    with torch.no_grad():
        fn(*inputs)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(*inputs)
            times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 2)


def bench(model: str, mode: str, batches: list[int], agents: int, lanes: int, repeats: int, aoti: bool) -> list[dict]:
    """One row per batch size: ``eager_ms``, ``program_ms`` and (with ``aoti``) ``aoti_ms`` per
    batch, with the export's and the compilation's seconds and the package's largest difference
    from the program."""
    from torch import _inductor

    from benchmarks.machine import cpu_name
    from forecast_peft.config import compose
    from forecast_peft.deploy import DeployedForecaster, compile_package, example_inputs, export
    from forecast_peft.evaluation import inference_network
    from forecast_peft.lit.modules import ForecastModule

    torch.manual_seed(0)
    device = torch.device("cpu")
    cfg = OmegaConf.to_container(compose("tune", [f"model={model}"]).model)
    network = inference_network(ForecastModule(model_cfg=cfg, mode=mode, optim={}).model).eval()
    start = time.perf_counter()
    program, _ = export(network, device)
    export_s = time.perf_counter() - start
    eager, runnable = DeployedForecaster(network).eval(), program.module()
    package, compile_s, package_diff = None, None, None
    if aoti:
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            checks = compile_package(program, Path(folder) / "m.aoti.pt2", device)
            compile_s = time.perf_counter() - start
            package = _inductor.aoti_load_package(str(Path(folder) / "m.aoti.pt2"))
        package_diff = max(c["max_diff_m"] for c in checks)
    rows = []
    for scenes in batches:
        inputs = example_inputs(scenes, agents, lanes, device)
        row = {
            "model": model,
            "mode": mode,
            "batch": scenes,
            "agents": agents,
            "lanes": lanes,
            "threads": torch.get_num_threads(),
            "cpu": cpu_name(),
            "torch": torch.__version__,
            "export_s": round(export_s, 1),
            "eager_ms": _ms_per_call(eager, inputs, repeats),
            "program_ms": _ms_per_call(runnable, inputs, repeats),
        }
        if package is not None:
            row.update(
                aoti_compile_s=round(compile_s, 1),
                aoti_max_diff_m=package_diff,
                aoti_ms=_ms_per_call(package, inputs, repeats),
            )
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="forecast_mae", help="a conf/model size: tiny, small or forecast_mae")
    parser.add_argument("--mode", default="peft", choices=("peft", "ft", "baseline"))
    parser.add_argument("--batches", default="1,32", help="scenes per batch, comma-separated")
    parser.add_argument("--agents", type=int, default=48)
    parser.add_argument("--lanes", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-aoti", action="store_true", help="leave out the AOTInductor package")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = bench(
        args.model,
        args.mode,
        [int(b) for b in args.batches.split(",")],
        args.agents,
        args.lanes,
        args.repeats,
        not args.no_aoti,
    )
    text = json.dumps(rows, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
