"""What rounding predicted positions to bfloat16 does to FDE and the miss rate: endpoints at a
given distance from the focal agent, predicted with a Rayleigh-distributed error (mean 1.4 m,
about the published minFDE6), scored as they are and after a round trip through bfloat16. This is
why the output heads run in float32 under bf16 autocast (``forecast_peft.models.layers.head_output``).

    python -m benchmarks.bf16_rounding
"""

from __future__ import annotations

import argparse
import math

import torch

from forecast_peft.constants import MISS_THRESHOLD_M


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--error-m", type=float, default=1.4, help="mean endpoint error of the predictions")
    args = parser.parse_args()
    torch.manual_seed(0)
    print("| endpoint distance | FDE float32 | FDE bf16 | change | largest rounding | MR float32 | MR bf16 |")
    print("|---|---|---|---|---|---|---|")
    for distance in (10, 30, 50, 80, 120, 160):
        angle = torch.rand(args.samples) * 2 * math.pi
        truth = distance * torch.stack([angle.cos(), angle.sin()], dim=-1)  # [S, 2] metres
        # a 2-D normal error of scale s has a Rayleigh norm with mean s * sqrt(pi / 2)
        pred = truth + torch.randn(args.samples, 2) * args.error_m / math.sqrt(math.pi / 2)
        rounded = pred.bfloat16().float()
        fde, fde_bf16 = (pred - truth).norm(dim=-1), (rounded - truth).norm(dim=-1)
        mr, mr_bf16 = (fde > MISS_THRESHOLD_M).float().mean(), (fde_bf16 > MISS_THRESHOLD_M).float().mean()
        change = 100 * (fde_bf16.mean() / fde.mean() - 1)
        print(
            f"| {distance} m | {fde.mean():.4f} | {fde_bf16.mean():.4f} | {change:+.2f}% "
            f"| {(rounded - pred).abs().max():.3f} m | {mr:.4f} | {mr_bf16:.4f} |"
        )


if __name__ == "__main__":
    main()
