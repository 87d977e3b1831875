"""A real end-to-end epoch on a GPU: packed cache -> DataLoader workers -> Lightning Trainer (PEFT
or MAE pre-training, published sizes) with the progress bar `fpeft` uses, or (--task infer)
`fpeft eval`'s own loop over size-ordered batches; with --compile the network is compiled as
`compile=true` does. Then the loader alone, to see whether the data path keeps up. The cache is
filled with AV2-sized random scenes (numpy only, so this runs where av2 and hydra are not
installed).

    python -m benchmarks.e2e_epoch --scenes 20000 --workers 8 --compile --out benchmarks/results/e2e.json
    python -m benchmarks.e2e_epoch --task infer --scenes 65536 --workers 12 --compile --out e2e_infer.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from benchmarks.machine import cpu_name, device_name
from benchmarks.scenes import add_slot_multiple_option, random_scene
from forecast_peft.data.cache import FORMAT_VERSION, INDEX_FILE, write_shard
from forecast_peft.data.files import write_json_atomic


def build_cache(root: Path, scenes: int, shard: int = 1024) -> None:
    rng = np.random.default_rng(0)
    split = root / "train"
    split.mkdir(parents=True)
    names = []
    for start in range(0, scenes, shard):
        batch = [random_scene(rng, i) for i in range(start, min(scenes, start + shard))]
        names.append(write_shard(split, f"shard-{len(names):05d}", batch, [s["scenario_id"] for s in batch]).name)
    write_json_atomic(
        split / INDEX_FILE, {"version": FORMAT_VERSION, "split": "train", "shards": names, "num_scenes": scenes}
    )


def train_epochs(args, dm, accelerator: str) -> list[float]:
    """Seconds of each of two Lightning training epochs (PEFT or MAE pre-training)."""
    import pytorch_lightning as pl

    from forecast_peft.lit.modules import ForecastModule, MAEModule
    from forecast_peft.lit.progress import StepProgressBar
    from forecast_peft.models.compile import maybe_compile
    from forecast_peft.models.config import ModelConfig
    from forecast_peft.models.layers import set_attention_kernel

    optim = {"lr": 1e-3, "weight_decay": 1e-4, "warmup_epochs": 0, "min_lr": 1e-6}
    model_cfg = ModelConfig().to_dict()
    module = MAEModule(model_cfg, optim) if args.task == "pretrain" else ForecastModule(model_cfg, "peft", optim)
    set_attention_kernel(module.model, args.attention_kernel)  # as attention_kernel= does
    maybe_compile(module.model, args.compile)
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=args.precision,
        max_epochs=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=not args.no_progress,
        callbacks=[] if args.no_progress else [StepProgressBar()],
        gradient_clip_val=5.0,
    )

    class Timer(pl.Callback):
        def __init__(self):
            self.epochs = []

        def on_train_epoch_start(self, trainer, pl_module):
            _sync()
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            _sync()
            self.epochs.append(time.perf_counter() - self.start)

    timer = Timer()
    trainer.callbacks.append(timer)
    trainer.fit(module, train_dataloaders=dm.loader("train", shuffle=True))
    return timer.epochs


def eval_passes(args, dm, device) -> list[float]:
    """Seconds of each of two passes of ``fpeft eval``'s loop (size-ordered batches, metrics per
    scene) with a PEFT model at the published sizes (untrained: the work is the same)."""
    from forecast_peft.evaluation import evaluate, inference_network, model_predictor
    from forecast_peft.models.choices import uses_cuda_graphs
    from forecast_peft.models.config import ModelConfig
    from forecast_peft.models.forecaster import build_forecaster

    model = build_forecaster(ModelConfig(), "peft").to(device).eval()
    mode = (args.compile_mode or "default") if args.compile else None
    model = inference_network(model, mode, args.attention_kernel)  # as fpeft eval
    precision = "bf16" if args.precision.startswith("bf16") else "32"
    predict = model_predictor(model, precision, uses_cuda_graphs(args.compile_mode))
    loader = dm.loader("train")  # unshuffled: the eval order (data.eval_order=size)
    seconds = []
    for _ in range(2):
        _sync()
        start = time.perf_counter()
        row, _ = evaluate("peft", predict, loader, device, progress=not args.no_progress)
        _sync()
        seconds.append(time.perf_counter() - start)
        assert row["scenes"] == args.scenes, row
    return seconds


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    import torch

    from forecast_peft.data.datamodule import ForecastDataModule
    from forecast_peft.models.choices import ATTENTION_KERNELS, COMPILE_MODES, uses_cuda_graphs
    from forecast_peft.models.compile import compilations, cudagraph_skips
    from forecast_peft.runtime import keep_freed_memory

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument(
        "--precision", default="bf16-mixed", help="Lightning's (32, bf16-mixed); infer: bf16 autocast or not"
    )
    parser.add_argument("--accelerator", default="gpu", help="gpu or cpu")
    parser.add_argument(
        "--task",
        choices=("peft", "pretrain", "infer"),
        default="peft",
        help="a training epoch (peft, pretrain) or a pass of fpeft eval's loop (infer)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the network (as compile=true)")
    parser.add_argument(
        "--compile-mode",
        choices=COMPILE_MODES,
        default=None,
        help="infer: torch.compile mode, as fpeft eval's compile_mode (implies --compile); reduce-overhead and "
        "max-autotune add CUDA graphs, with batches in fixed shapes",
    )
    parser.add_argument(
        "--attention-kernel",
        choices=ATTENTION_KERNELS,
        default="auto",
        help="the transformer attention's kernel, as attention_kernel= (varlen: no padding computed)",
    )
    add_slot_multiple_option(parser)
    parser.add_argument("--train-order", choices=("random", "bucket"), default="random", help="data.train_order")
    parser.add_argument("--no-progress", action="store_true", help="without the progress bar")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.compile_mode is not None and args.task != "infer":
        parser.error("--compile-mode is for --task infer (training compiles as compile=true does)")
    args.compile = args.compile or args.compile_mode is not None
    malloc_kept = keep_freed_memory()  # as fpeft does
    tmp = Path(tempfile.mkdtemp(prefix="fpeft-e2e-"))
    try:  # the cache can be GBs: it goes whatever happens
        t0 = time.perf_counter()
        build_cache(tmp, args.scenes)
        build_s = time.perf_counter() - t0
        data = SimpleNamespace(
            cache_dir=str(tmp),
            train_fraction=1.0,
            subset_seed=0,
            num_workers=args.workers,
            batch_size=args.batch,
            eval_batch_size=args.batch,
            pin_memory=True,
            shuffle=True,
            train_order=args.train_order,
            eval_order="size",
            slot_multiple=args.slot_multiple,
        )
        graphs = uses_cuda_graphs(args.compile_mode)
        dm = ForecastDataModule(data, static_shapes=graphs)
        infer = args.task == "infer"
        compiled_before, skipped_before = compilations(), cudagraph_skips()
        device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
        if infer:
            seconds = eval_passes(args, dm, device)
        else:
            seconds = train_epochs(args, dm, args.accelerator)
        # loader alone, same workers and order: can the data path feed the GPU?
        t0 = time.perf_counter()
        n = sum(b["x"].shape[0] for b in dm.loader("train", shuffle=not infer))
        loader_rate = n / (time.perf_counter() - t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = {
        "task": args.task,
        "order": "size" if infer else args.train_order,
        "scenes": args.scenes,
        "batch": args.batch,
        "precision": args.precision,
        "workers": args.workers,
        "epoch_seconds": [round(s, 1) for s in seconds],
        "epoch_scenes_per_s": [round(args.scenes / s, 1) for s in seconds],
        "loader_only_scenes_per_s": round(loader_rate, 1),
        "cache_build_s": round(build_s, 1),
        "gpu": device_name(device),
        "cpu": cpu_name(),
        "compiled": args.compile,
        "compilations": compilations() - compiled_before,  # 1: one graph for every batch shape
        "compile_mode": (args.compile_mode or "default") if args.compile else None,
        "attention_kernel": args.attention_kernel,
        "slot_multiple": None if graphs else args.slot_multiple,
        "static_shapes": graphs,  # batches in a few fixed shapes, one CUDA graph each
        "cudagraph_skips": cudagraph_skips() - skipped_before if graphs else None,
        "progress_bar": not args.no_progress,
        "malloc_kept": malloc_kept,
        "torch": torch.__version__,
    }
    print(json.dumps(report, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
