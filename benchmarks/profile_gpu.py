"""Where the GPU time of a training or inference step goes (torch.profiler, kernels by their own
time), for one task/batch/precision; --device cpu profiles the CPU the same way. Above the table,
one line per step: the wall time of an unprofiled step, the time the device spent in kernels, and
the kernels launched. Device time far under the wall time means the host (Python, inductor's
wrapper, the launches) sets the pace; close to it, the kernels do. Inference runs the network as
``fpeft eval`` does (adapters folded in).

python -m benchmarks.profile_gpu --task peft --batch 128 --precision bf16 [--compile] [--out FILE]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.bench_train import build, to, with_masks
from benchmarks.scenes import random_batch
from forecast_peft.lit.losses import forecast_losses
from forecast_peft.models.choices import ATTENTION_KERNELS
from forecast_peft.models.compile import maybe_compile
from forecast_peft.models.config import ModelConfig
from forecast_peft.models.layers import set_attention_kernel
from forecast_peft.peft.fold import fold_adapters


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--task", default="peft", help="pretrain, peft, ft or infer")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model as compile=true does")
    parser.add_argument("--attention-kernel", choices=ATTENTION_KERNELS, default="auto", help="see bench_train.py")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args()
    cfg = ModelConfig()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    model = build(args.task, cfg).to(device).train(args.task != "infer")
    if args.task == "infer":
        model = fold_adapters(model)
    set_attention_kernel(model, args.attention_kernel)
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
    timed = 10
    start = time.perf_counter()
    for _ in range(timed):
        step()
    sync()
    wall_ms = (time.perf_counter() - start) / timed * 1e3
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            step()
        sync()
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = prof.key_averages()
    table = events.table(sort_by=sort, row_limit=args.rows, max_name_column_width=60)
    if cuda:
        cuda_type = torch.autograd.DeviceType.CUDA
        kernels = [e for e in prof.events() if getattr(e, "device_type", None) == cuda_type]
        # the kernels' rows alone: the operator that launched a kernel carries its time too (session
        # 26's H200 line summed both and said 23.95 ms of a 13.10 ms step; the table's total, 35.93 ms
        # over 3 steps, counts the kernels once)
        kernel_rows = [e for e in events if e.device_type == cuda_type and not getattr(e, "is_user_annotation", False)]
        busy_ms = sum(e.self_device_time_total for e in kernel_rows) / 3 / 1e3
        summary = (
            f"per step: wall {wall_ms:.2f} ms (unprofiled, mean of {timed}), device busy {busy_ms:.2f} ms "
            f"(kernels' own time), {len(kernels) / 3:.0f} kernels"
        )
    else:
        summary = f"per step: wall {wall_ms:.2f} ms (unprofiled, mean of {timed})"
    table = f"{summary}\n{table}"
    print(table)
    if args.out is not None:
        name = torch.cuda.get_device_name() if cuda else "cpu"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"{vars(args)}\n{name}, torch {torch.__version__}\n{table}\n")


if __name__ == "__main__":
    main()
