"""Running predictors (checkpoints and simple baselines) over a split and scoring them."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import torch
from tqdm import tqdm

from forecast_peft.constants import CURRENT_STEP, FUTURE_STEPS, METRICS, NUM_MODES
from forecast_peft.metrics import ForecastMetrics, scene_metrics

Predictor = Callable[[dict], tuple[torch.Tensor, torch.Tensor]]
CV_STEPS = 5  # constant velocity: mean displacement over the last 5 observed steps


def to_world(local: torch.Tensor, origin: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Focal-frame points [B, ..., 2] back to city coordinates: ``local @ R^T + origin`` with
    R = [[cos t, -sin t], [sin t, cos t]] (the inverse of ``(p - origin) @ R``). origin [B, 2], theta [B]."""
    c, s = torch.cos(theta), torch.sin(theta)
    rot_t = torch.stack([torch.stack([c, s], -1), torch.stack([-s, c], -1)], -2)  # [B, 2, 2] = R^T
    shape = (local.shape[0],) + (1,) * (local.ndim - 2) + (2,)
    flat = local.reshape(local.shape[0], -1, 2) @ rot_t
    return flat.reshape(local.shape) + origin.view(shape)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def constant_velocity(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The focal agent keeps its recent velocity: one trajectory repeated over the modes."""
    v = batch["x"][:, 0, CURRENT_STEP + 1 - CV_STEPS : CURRENT_STEP + 1].mean(1)  # [B, 2] m per step
    steps = torch.arange(1, FUTURE_STEPS + 1, device=v.device, dtype=v.dtype)
    traj = v[:, None, :] * steps[None, :, None]  # [B, 60, 2]
    return traj[:, None].expand(-1, NUM_MODES, -1, -1), torch.zeros(v.shape[0], NUM_MODES, device=v.device)


PRECISIONS = ("32", "bf16")


def check_precision(precision) -> str:
    """An inference precision as one of ``PRECISIONS``, or a one-line error."""
    precision = str(precision)
    if precision not in PRECISIONS:
        from forecast_peft.errors import UserError

        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    return precision


def model_predictor(model: torch.nn.Module, precision: str = "32") -> Predictor:
    """``precision`` 32 (float32) or bf16 (bfloat16 autocast: about 2x faster on GPUs; measured
    within 0.02% of float32 minFDE6 on an H100, benchmarks/results/h100_bf16_check.json)."""
    autocast = check_precision(precision) == "bf16"

    @torch.inference_mode()
    def predict(batch: dict):
        with torch.autocast(device_type=batch["x"].device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(batch)
        return out["y_hat"].float(), out["pi"].float()

    return predict


def evaluate(
    name: str, predict: Predictor, loader, device: torch.device, trainable_params: int = 0, progress: bool = True
) -> tuple[dict, pd.DataFrame]:
    """Score ``predict`` on every batch of ``loader``: a report row and per-scenario metrics.
    Per-scene values stay on the device until the end: no batch waits for the one before."""
    metrics = ForecastMetrics().to(device)
    per_scene: list[dict[str, torch.Tensor]] = []
    ids: list[str] = []
    for batch in tqdm(loader, desc=f"eval {name}", unit="batch", disable=not progress, leave=False):
        batch = to_device(batch, device)
        y_hat, pi = predict(batch)
        y = batch["y"][:, 0]
        metrics.update(y_hat, pi, y)
        per_scene.append(scene_metrics(y_hat, pi, y))
        ids.extend(batch["scenario_id"])
    columns = {k: torch.cat([v[k] for v in per_scene]) if per_scene else torch.zeros(0) for k in METRICS}
    frame = pd.DataFrame({k: v.cpu().numpy() for k, v in columns.items()})
    frame.insert(0, "scenario_id", ids)
    frame.insert(0, "name", name)
    summary = {k: float(v) for k, v in metrics.compute().items()}
    row = {
        "name": name,
        **{m: summary[m] for m in METRICS},
        "scenes": int(metrics.count),
        "trainable_params": trainable_params,
    }
    # per scenario in id order, whatever order the loader's batches came in
    return row, frame.sort_values("scenario_id", kind="stable", ignore_index=True)
