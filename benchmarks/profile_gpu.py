"""Where the GPU time of a training or inference step goes (torch.profiler, kernels by their own
time), for one task/batch/precision; --device cpu profiles the CPU the same way.

python -m benchmarks.profile_gpu --task peft --batch 128 --precision bf16 [--compile] [--out FILE]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.bench_train import build, to, with_masks
from benchmarks.scenes import random_batch
from forecast_peft.lit.losses import forecast_losses
from forecast_peft.models.compile import maybe_compile
from forecast_peft.models.config import ModelConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--task", default="peft", help="pretrain, peft, ft or infer")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model as compile=true does")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args()
    cfg = ModelConfig()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    model = build(args.task, cfg).to(device).train(args.task != "infer")
    maybe_compile(model, args.compile)
    host = random_batch(args.batch)
    on_device = to(host, device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step():
        batch = with_masks(args.task, host, on_device, cfg)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            if args.task == "infer":
                with torch.no_grad():
                    return model(batch)
            out = model(batch)
            loss = out["loss"] if args.task == "pretrain" else forecast_losses(out, batch, cfg.reg_weight)["loss"]
        loss.backward()

    for _ in range(3):
        step()
    sync()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            step()
        sync()
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60)
    print(table)
    if args.out is not None:
        name = torch.cuda.get_device_name() if cuda else "cpu"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"{vars(args)}\n{name}, torch {torch.__version__}\n{table}\n")


if __name__ == "__main__":
    main()
