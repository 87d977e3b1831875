"""`fpeft deploy`'s files against the network they come from: the seconds to export and to compile
with AOTInductor, and milliseconds per batch of random AV2-sized scenes (``deploy.example_inputs``)
for the eager network (adapters folded, as `fpeft eval` runs it), the exported program and the
AOTInductor package. Random weights of a model size (the timings do not depend on the values).
The published size (forecast_mae) needs neither hydra nor omegaconf, which the GPU machine lacks
(``gpu_suite.sh deploy``).

    python -m benchmarks.bench_deploy --model forecast_mae --out benchmarks/results/deploy_cpu.json
    python -m benchmarks.bench_deploy --device cuda --batches 1,32,128 --out deploy_gpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _ms_per_call(fn, inputs, repeats: int, device: torch.device) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.no_grad():
        fn(*inputs)  # warm-up
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(*inputs)
            sync()
            times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 2)


def _model_config(model: str) -> dict:
    """The published size from its dataclass's defaults (no hydra); the others from conf/model."""
    from forecast_peft.models.config import ModelConfig

    if model == "forecast_mae":
        return ModelConfig().to_dict()
    from omegaconf import OmegaConf

    from forecast_peft.config import compose

    return OmegaConf.to_container(compose("tune", [f"model={model}"]).model)


def bench(
    model: str,
    mode: str,
    batches: list[int],
    agents: int,
    lanes: int,
    repeats: int,
    aoti: bool,
    device: str = "cpu",
    precisions: tuple[str, ...] = ("32",),
) -> list[dict]:
    """One row per precision and batch size: ``eager_ms``, ``program_ms`` and (with ``aoti``)
    ``aoti_ms`` per batch, with the export's and the compilation's seconds and the package's
    largest difference from the program."""
    from forecast_peft.evaluation import inference_network
    from forecast_peft.lit.modules import ForecastModule

    torch.manual_seed(0)
    device = torch.device(device)
    network = inference_network(ForecastModule(model_cfg=_model_config(model), mode=mode, optim={}).model)
    network = network.to(device).eval()
    rows = []
    for precision in precisions:
        rows += _rows(network, precision, device, batches, agents, lanes, repeats, aoti)
    return [{"model": model, "mode": mode, **row} for row in rows]


def _rows(network, precision, device, batches, agents, lanes, repeats, aoti) -> list[dict]:  # noqa: PLR0913
    """``bench``'s rows of one precision."""
    from torch import _inductor

    from benchmarks.machine import cpu_name, device_name
    from forecast_peft.deploy import DeployedForecaster, compile_package, example_inputs, export

    start = time.perf_counter()
    program, checks = export(network, device, precision)
    export_s = time.perf_counter() - start
    eager, runnable = DeployedForecaster(network, precision).eval(), program.module()
    package, compile_s, package_diff = None, None, None
    if aoti:
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            package_checks = compile_package(program, Path(folder) / "m.aoti.pt2", device, checks)
            compile_s = time.perf_counter() - start
            package = _inductor.aoti_load_package(str(Path(folder) / "m.aoti.pt2"))
        package_diff = max(c["max_diff_m"] for c in package_checks)
    rows = []
    for scenes in batches:
        inputs = example_inputs(scenes, agents, lanes, device)
        row = {
            "precision": precision,
            "batch": scenes,
            "agents": agents,
            "lanes": lanes,
            "threads": torch.get_num_threads(),
            "cpu": cpu_name(),
            "device": device_name(device),
            "torch": torch.__version__,
            "export_s": round(export_s, 1),
            "eager_ms": _ms_per_call(eager, inputs, repeats, device),
            "program_ms": _ms_per_call(runnable, inputs, repeats, device),
        }
        if package is not None:
            row.update(
                aoti_compile_s=round(compile_s, 1),
                aoti_max_diff_m=package_diff,
                aoti_ms=_ms_per_call(package, inputs, repeats, device),
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
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where the files are exported and timed")
    parser.add_argument("--precisions", default="32", help="32 and/or bf16, comma-separated (deploy's precision)")
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
        args.device,
        tuple(args.precisions.split(",")),
    )
    text = json.dumps(rows, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
