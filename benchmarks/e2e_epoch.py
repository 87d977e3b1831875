"""A real end-to-end training epoch on a GPU: packed cache -> DataLoader workers -> Lightning
Trainer (PEFT or MAE pre-training, published sizes), with the progress bar `fpeft` uses and,
with --compile, the network compiled as `compile=true` does. The cache is filled with AV2-sized
random scenes (numpy only, so this runs where av2 and hydra are not installed).

    python benchmarks/e2e_epoch.py --scenes 20000 --workers 8 --compile --out benchmarks/results/e2e.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.scenes import random_scene  # noqa: E402
from forecast_peft.data.cache import FORMAT_VERSION, INDEX_FILE, write_json_atomic, write_shard  # noqa: E402


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


def main() -> None:
    import pytorch_lightning as pl
    import torch

    from forecast_peft.data.datamodule import ForecastDataModule
    from forecast_peft.lit.modules import ForecastModule, MAEModule
    from forecast_peft.lit.progress import StepProgressBar
    from forecast_peft.models.compile import maybe_compile
    from forecast_peft.models.config import ModelConfig

    parser = argparse.ArgumentParser()
    parser.add_argument("--scenes", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--task", choices=("peft", "pretrain"), default="peft")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network (as compile=true)")
    parser.add_argument("--train-order", choices=("random", "bucket"), default="random", help="data.train_order")
    parser.add_argument("--no-progress", action="store_true", help="without the progress bar")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fpeft-e2e-"))
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
    )
    dm = ForecastDataModule(data)
    optim = {"lr": 1e-3, "weight_decay": 1e-4, "warmup_epochs": 0, "min_lr": 1e-6}
    model_cfg = ModelConfig().to_dict()
    module = MAEModule(model_cfg, optim) if args.task == "pretrain" else ForecastModule(model_cfg, "peft", optim)
    maybe_compile(module.model, args.compile)
    trainer = pl.Trainer(
        accelerator=args.accelerator,
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
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.epochs.append(time.perf_counter() - self.start)

    timer = Timer()
    trainer.callbacks.append(timer)
    trainer.fit(module, train_dataloaders=dm.loader("train", shuffle=True))
    # loader alone, same workers: can the data path feed the GPU?
    t0 = time.perf_counter()
    n = sum(b["x"].shape[0] for b in dm.loader("train", shuffle=True))
    loader_rate = n / (time.perf_counter() - t0)
    report = {
        "task": args.task,
        "train_order": args.train_order,
        "scenes": args.scenes,
        "batch": args.batch,
        "precision": args.precision,
        "workers": args.workers,
        "epoch_seconds": [round(s, 1) for s in timer.epochs],
        "epoch_scenes_per_s": [round(args.scenes / s, 1) for s in timer.epochs],
        "loader_only_scenes_per_s": round(loader_rate, 1),
        "cache_build_s": round(build_s, 1),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "compiled": args.compile,
        "progress_bar": not args.no_progress,
        "torch": torch.__version__,
    }
    print(json.dumps(report, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
