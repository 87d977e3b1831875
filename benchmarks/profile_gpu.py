"""Where the GPU time of one training step goes (torch.profiler), for one task/batch/precision.

python benchmarks/profile_gpu.py --task peft --batch 128 --precision bf16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_train import build, to  # noqa: E402
from benchmarks.scenes import random_batch  # noqa: E402
from forecast_peft.lit.losses import forecast_losses  # noqa: E402
from forecast_peft.models.config import ModelConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="peft")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--rows", type=int, default=30)
    args = parser.parse_args()
    cfg = ModelConfig()
    model = build(args.task, cfg).cuda().train(args.task != "infer")
    batch = to(random_batch(args.batch), torch.device("cuda"))

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            if args.task == "infer":
                with torch.no_grad():
                    return model(batch)
            out = model(batch)
            loss = out["loss"] if args.task == "pretrain" else forecast_losses(out, batch, cfg.reg_weight)["loss"]
        loss.backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]
    ) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
