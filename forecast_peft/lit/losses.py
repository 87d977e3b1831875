"""Forecasting losses: winner-takes-all regression of the best mode, mode classification."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from forecast_peft.constants import HISTORY_STEPS
from forecast_peft.models.mae import masked_mean


def forecast_losses(
    out: dict, batch: dict, reg_weight: float, best: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The best mode minimises the summed L2 error to the focal agent's future; smooth-L1 on it
    (times ``reg_weight``) plus cross-entropy of the scores towards it. With ``y_hat_others``
    (the Forecast-MAE baseline) a smooth-L1 term for the other agents' futures is added.
    ``best`` [B]: the winning modes chosen before (``best_modes``), for comparing one objective
    across devices: an untrained network's modes lie within 1e-6 of each other, so rounding
    picks its winners."""
    y, valid = focal_future(batch)
    y_hat, pi = out["y_hat"].float(), out["pi"].float()
    if best is None:
        best = nearest_mode(y_hat, y, valid)
    y_best = y_hat[torch.arange(y.shape[0], device=y.device), best]
    reg = masked_mean(F.smooth_l1_loss(y_best, y, reduction="none"), valid[..., None])
    cls = F.cross_entropy(pi, best)
    losses = {"reg": reg, "cls": cls, "loss": reg_weight * reg + cls}
    if "y_hat_others" in out:
        mask = ~batch["x_padding_mask"][:, 1:, HISTORY_STEPS:]
        others = masked_mean(
            F.smooth_l1_loss(out["y_hat_others"].float(), batch["y"][:, 1:], reduction="none"), mask[..., None]
        )
        losses["others"] = others
        losses["loss"] = losses["loss"] + others
    return losses


def focal_future(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The focal agent's future [B, 60, 2] and which of its steps are observed [B, 60]."""
    return batch["y"][:, 0], ~batch["x_padding_mask"][:, 0, HISTORY_STEPS:]


def nearest_mode(y_hat: torch.Tensor, y: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The mode [B] of y_hat [B, K, 60, 2] with the smallest summed L2 error to y over its valid steps."""
    return (torch.linalg.vector_norm(y_hat - y[:, None], dim=-1) * valid[:, None]).sum(-1).argmin(-1)


def best_modes(out: dict, batch: dict) -> torch.Tensor:
    """The mode [B] whose trajectory has the smallest summed L2 error to the focal agent's
    future, over its valid steps (the winner ``forecast_losses`` trains)."""
    return nearest_mode(out["y_hat"].float(), *focal_future(batch))
