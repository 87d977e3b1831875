"""minADE / minFDE / miss rate / brier-minFDE as a torchmetrics Metric with summed states, so the
values stay exact under multi-GPU (DDP) evaluation.

Rules (those of the Argoverse 2 leaderboard): K=6 metrics take the mode with the smallest
endpoint error; minADE6 is that mode's ADE (not the smallest ADE over modes). K=1 metrics use
the most probable mode. MR6: that best endpoint error exceeds 2 m. brier-minFDE6 adds
(1 - p)^2 with p the softmax probability of the best mode.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from forecast_peft.constants import HORIZON_COLUMNS, HORIZONS_S, HZ, METRICS, MISS_THRESHOLD_M


def scene_metrics(y_hat: torch.Tensor, pi: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-scene metrics. y_hat [B, K, T, 2], pi [B, K] logits, y [B, T, 2] -> dict of [B]: each
    of ``METRICS``; ``MODE_COLUMNS``: which modes they scored (the most probable, with its
    probability; the one nearest the endpoint); and ``HORIZON_COLUMNS``: the smallest error over
    the modes at each of ``HORIZONS_S`` seconds ahead (each horizon its own nearest mode, as if
    the forecast ended there; NaN where any mode's is)."""
    err = torch.linalg.vector_norm(y_hat.float() - y.float()[:, None], dim=-1)  # [B, K, T]
    ade, fde = err.mean(-1), err[..., -1]
    rows = torch.arange(y.shape[0], device=y.device)
    best = fde.argmin(-1)
    top = pi.argmax(-1)
    probs = torch.softmax(pi.float(), dim=-1)
    prob = probs[rows, best]
    min_fde = fde[rows, best]
    horizons = {  # torch's amin gives NaN where any value is: a NaN mode is not passed over
        column: err[..., seconds * HZ - 1].amin(-1) for seconds, column in zip(HORIZONS_S, HORIZON_COLUMNS, strict=True)
    }
    return {
        "minADE1": ade[rows, top],
        "minFDE1": fde[rows, top],
        "minADE6": ade[rows, best],
        "minFDE6": min_fde,
        "MR6": (~(min_fde <= MISS_THRESHOLD_M)).float(),  # a NaN endpoint (a diverged model) is a miss, not a hit
        "brier-minFDE6": min_fde + (1.0 - prob) ** 2,
        "top_mode": top,
        "top_prob": probs[rows, top],
        "best_mode": best,
        **horizons,
    }


class ForecastMetrics(Metric):
    """Sums of every metric of ``METRICS`` and the scene count; ``compute`` returns the means."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        for name in METRICS:
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self, y_hat: torch.Tensor, pi: torch.Tensor, y: torch.Tensor, values: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Add a batch's scenes; ``values``: its ``scene_metrics``, where the caller has them already."""
        if values is None:
            values = scene_metrics(y_hat, pi, y)
        for name in METRICS:
            setattr(self, name, getattr(self, name) + values[name].sum().double())
        # out of place: under spawn-based DDP on the CPU, state tensors inherited from the parent
        # live in shared memory, and an in-place add would count every process's scenes twice
        self.count = self.count + y.shape[0]

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.count.clamp(min=1).double()
        return {name: (getattr(self, name) / n).float() for name in METRICS}
