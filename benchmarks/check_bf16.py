"""bf16 against fp32 predictions of one trained checkpoint: train a published-size PEFT model
briefly on AV2-sized random scenes, then compare minFDE6 of fp32 and bf16 inference on held-out
scenes (the same weights and data). A briefly trained model misses by metres, where any rounding
is lost in the ratio, so the check also gives how far the bf16 endpoints lie from the fp32 ones
(metres, over every mode): the most bf16 can move a minFDE6, to set against the published 1.43 m.

    python benchmarks/check_bf16.py --out benchmarks/results/bf16_check.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_train import build, to  # noqa: E402
from benchmarks.scenes import random_batch  # noqa: E402
from forecast_peft.lit.losses import forecast_losses  # noqa: E402
from forecast_peft.lit.optim import param_groups  # noqa: E402
from forecast_peft.metrics import ForecastMetrics  # noqa: E402
from forecast_peft.models.config import ModelConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    cfg = ModelConfig()
    model = build("peft", cfg).to(device).train()
    opt = torch.optim.AdamW(param_groups(model, 1e-4), lr=1e-3)
    train = [to(random_batch(args.batch, seed=1000 + s), device) for s in range(8)]
    for step in range(args.steps):
        batch = train[step % len(train)]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = forecast_losses(model(batch), batch, cfg.reg_weight)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    results, endpoints = {}, {}
    for precision in ("fp32", "bf16"):
        metrics = ForecastMetrics().to(device)
        ends = []
        for s in range(args.eval_batches):
            batch = to(random_batch(args.batch, seed=s), device)
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                out = model(batch)
            metrics.update(out["y_hat"].float(), out["pi"].float(), batch["y"][:, 0])
            ends.append(out["y_hat"][:, :, -1].float())  # [B, K, 2]
        results[precision] = {k: float(v) for k, v in metrics.compute().items()}
        endpoints[precision] = torch.cat(ends)
    shift = (endpoints["bf16"] - endpoints["fp32"]).norm(dim=-1)  # [scenes, K] metres
    reach = endpoints["fp32"].norm(dim=-1)  # how far out the predicted endpoints lie
    rel = abs(results["bf16"]["minFDE6"] - results["fp32"]["minFDE6"]) / results["fp32"]["minFDE6"]
    report = {
        "train_steps": args.steps,
        "final_train_loss": float(loss),
        "scenes": args.eval_batches * args.batch,
        "minFDE6_rel_diff": rel,
        "endpoint_shift_mean_m": float(shift.mean()),
        "endpoint_shift_max_m": float(shift.max()),
        "endpoint_distance_median_m": float(reach.median()),
        "endpoint_distance_max_m": float(reach.max()),
        **results,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    }
    print(json.dumps(report, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
