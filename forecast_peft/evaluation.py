"""Running predictors (checkpoints and simple baselines) over a split and scoring them."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import torch

from forecast_peft.constants import (
    CITY,
    CURRENT_STEP,
    FOCAL_TYPE,
    FUTURE_STEPS,
    HORIZON_COLUMNS,
    HZ,
    MANOEUVRE,
    MANOEUVRES,
    METRICS,
    MISS_THRESHOLD_M,
    MODE_COLUMNS,
    NUM_MODES,
    OBJECT_TYPES,
    TURN_RAD,
)
from forecast_peft.lane_following import lane_following
from forecast_peft.metrics import ForecastMetrics, scene_metrics
from forecast_peft.runtime import progress_bar

Predictor = Callable[[dict], tuple[torch.Tensor, torch.Tensor]]
CV_STEPS = 5  # constant velocity: mean displacement over the last 5 observed steps
# kinematic_modes: (longitudinal acceleration m/s^2, lateral acceleration m/s^2 (+ left), score)
# per mode; the turn rate is the lateral acceleration over the speed, at most MAX_TURN_RATE
KINEMATIC_MODES = (
    (0.0, 0.0, 1.0),  # keep speed and heading (constant velocity)
    (-3.0, 0.0, 0.0),  # brake to a stop
    (-1.0, 0.0, 0.0),  # slow down
    (1.0, 0.0, 0.0),  # speed up
    (0.0, 2.0, 0.0),  # turn left
    (0.0, -2.0, 0.0),  # turn right
)
MAX_TURN_RATE = 0.5  # rad/s: a right-angle turn in about 3 s
HEADING_MIN_SPEED = 0.5  # m/s: slower agents' modes follow the recorded heading, not the velocity


def to_world(local: torch.Tensor, origin: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Focal-frame points [B, ..., 2] back to city coordinates: ``local @ R^T + origin`` with
    R = [[cos t, -sin t], [sin t, cos t]] (the inverse of ``(p - origin) @ R``). origin [B, 2], theta [B]."""
    c, s = torch.cos(theta), torch.sin(theta)
    rot_t = torch.stack([torch.stack([c, s], -1), torch.stack([-s, c], -1)], -2)  # [B, 2, 2] = R^T
    shape = (local.shape[0],) + (1,) * (local.ndim - 2) + (2,)
    flat = local.reshape(local.shape[0], -1, 2) @ rot_t
    return flat.reshape(local.shape) + origin.view(shape)


def to_focal(world: torch.Tensor, origin: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """City-coordinate points [B, ..., 2] in the focal frame: ``(p - origin) @ R`` (``to_world``'s
    inverse), which is ``to_world`` of ``p - origin`` by ``-theta``: R(-t)^T = R(t)."""
    shape = (world.shape[0],) + (1,) * (world.ndim - 2) + (2,)
    return to_world(world - origin.view(shape), torch.zeros_like(origin), -theta)


def probability_scores(probabilities: torch.Tensor) -> torch.Tensor:
    """Probabilities [..., K] as the scores a predictor returns, whose softmax gives them back: their
    logarithms, a probability of 0 as the smallest normal number's (softmax takes it back to 0)."""
    return torch.log(probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny))


def focal_manoeuvres(batch: dict) -> torch.Tensor:
    """What each scene's focal agent does over the 6 s of its ground truth, as an index of
    ``MANOEUVRES`` [B]: stationary where it ends within ``MISS_THRESHOLD_M`` of where it is now,
    else a left or right turn where its heading at the end differs from its heading now by more
    than ``TURN_RAD`` (as `fpeft synth --stats` counts turns), else straight."""
    turn = batch["x_angles"][:, 0, -1]  # [B] rad, against the heading now (the focal frame's x axis)
    kind = torch.zeros_like(turn, dtype=torch.long)  # straight
    kind = torch.where(turn > TURN_RAD, MANOEUVRES.index("left turn"), kind)
    kind = torch.where(turn < -TURN_RAD, MANOEUVRES.index("right turn"), kind)
    stays = batch["y"][:, 0, -1].norm(dim=-1) < MISS_THRESHOLD_M  # [B]
    return torch.where(stays, MANOEUVRES.index("stationary"), kind)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def recent_velocity(batch: dict) -> torch.Tensor:
    """The focal agent's mean displacement over its last ``CV_STEPS`` observed steps: [B, 2] m per step."""
    return batch["x"][:, 0, CURRENT_STEP + 1 - CV_STEPS : CURRENT_STEP + 1].mean(1)


def straight_path(v: torch.Tensor) -> torch.Tensor:
    """The future positions [B, 60, 2] of keeping the velocity v [B, 2] (m per step)."""
    steps = torch.arange(1, FUTURE_STEPS + 1, device=v.device, dtype=v.dtype)
    return v[:, None, :] * steps[None, :, None]


def constant_velocity(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The focal agent keeps its recent velocity: one trajectory repeated over the modes."""
    v = recent_velocity(batch)
    traj = straight_path(v)
    return traj[:, None].expand(-1, NUM_MODES, -1, -1), torch.zeros(v.shape[0], NUM_MODES, device=v.device)


def kinematic_heading(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The focal agent's recent velocity [B, 2] (m per step, ``recent_velocity``) and the heading
    its modes take [B] (rad): along the velocity, or the recorded heading for an agent slower than
    ``HEADING_MIN_SPEED`` (whose velocity direction is mostly tracking noise)."""
    per_step = recent_velocity(batch)
    v = per_step * HZ  # [B, 2] m/s
    recorded = batch["x_angles"][:, 0, CURRENT_STEP].to(v.dtype)
    return per_step, torch.where(v.norm(dim=-1) >= HEADING_MIN_SPEED, torch.atan2(v[:, 1], v[:, 0]), recorded)


def kinematic_modes(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Six kinematic hypotheses from the focal agent's recent velocity (``KINEMATIC_MODES``): keep
    going, brake to a stop, slow down, speed up, turn left, turn right; a multimodal reference
    for the K=6 metrics. The first mode is ``constant_velocity``'s trajectory and scores highest.
    The modes head along the velocity, or along the recorded heading for an agent slower than
    ``HEADING_MIN_SPEED`` (whose velocity direction is mostly tracking noise)."""
    per_step, heading = kinematic_heading(batch)
    v = per_step * HZ  # [B, 2] m/s
    speed = v.norm(dim=-1)  # [B]
    modes = torch.tensor(KINEMATIC_MODES, dtype=v.dtype, device=v.device)  # [K, 3]
    accel, lateral, score = modes.unbind(-1)
    t = torch.arange(1, FUTURE_STEPS + 1, dtype=v.dtype, device=v.device) / HZ  # [T] s
    mid = t - 0.5 / HZ  # each step moves with the speed and heading of its middle
    speeds = (speed[:, None, None] + accel[None, :, None] * mid).clamp(min=0)  # [B, K, T]
    rate = (lateral[None] / speed[:, None].clamp(min=1e-3)).clamp(-MAX_TURN_RATE, MAX_TURN_RATE)  # [B, K]
    headings = heading[:, None, None] + rate[..., None] * mid  # [B, K, T]
    steps = torch.stack([headings.cos(), headings.sin()], -1) * (speeds / HZ)[..., None]  # [B, K, T, 2]
    trajectories = steps.cumsum(dim=2)
    trajectories[:, 0] = straight_path(per_step)  # exactly constant_velocity's trajectory
    return trajectories, score[None].expand(v.shape[0], -1)


BASELINES: dict[str, Predictor] = {
    "constant_velocity": constant_velocity,
    "kinematic_modes": kinematic_modes,
    "lane_following": lane_following,
}

PRECISIONS = ("32", "bf16")


def check_baselines(names) -> None:
    """A one-line error for any of ``names`` that is not one of ``BASELINES``."""
    unknown = [name for name in names if name not in BASELINES]
    if unknown:
        from forecast_peft.errors import UserError

        raise UserError(f"unknown baseline {', '.join(unknown)} (baselines: {', '.join(BASELINES)})")


def check_precision(precision) -> str:
    """An inference precision as one of ``PRECISIONS``, or a one-line error."""
    precision = str(precision)
    if precision not in PRECISIONS:
        from forecast_peft.errors import UserError

        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    return precision


def inference_network(model: torch.nn.Module, mode: str | None = None, kernel: str = "auto") -> torch.nn.Module:
    """The network ``fpeft eval``, ``predict`` and ``viz`` run for a tuned ``model``: a copy with
    its adapters folded into the layers beside them (``peft.fold``: the same forecasts, four matrix
    products per transformer block instead of eight), its attention held to ``kernel``
    (``models.choices.ATTENTION_KERNELS``), compiled in torch.compile's ``mode`` (None: not
    compiled). ``model`` itself is left as it is."""
    from forecast_peft.models.compile import maybe_compile
    from forecast_peft.models.layers import set_attention_kernel
    from forecast_peft.peft.fold import fold_adapters

    network = fold_adapters(model)
    set_attention_kernel(network, kernel)
    maybe_compile(network, mode is not None, mode)
    return network


def model_predictor(model: torch.nn.Module, precision: str = "32", cuda_graphs: bool = False) -> Predictor:
    """``precision`` 32 (float32) or bf16 (bfloat16 autocast: about 2x faster on GPUs; the output
    heads run in float32, ``head_output``; benchmarks/check_bf16.py measures the difference).
    ``cuda_graphs``: ``model`` was compiled in a mode that records CUDA graphs, whose outputs the
    next call overwrites: each call starts a new step and returns copies."""
    autocast = check_precision(precision) == "bf16"

    @torch.inference_mode()
    def predict(batch: dict):
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device_type=batch["x"].device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(batch)
        y_hat, pi = out["y_hat"].float(), out["pi"].float()
        return (y_hat.clone(), pi.clone()) if cuda_graphs else (y_hat, pi)

    return predict


def evaluate(
    name: str, predict: Predictor, loader, device: torch.device, trainable_params: int = 0, progress: bool = True
) -> tuple[dict, pd.DataFrame]:
    """Score ``predict`` on every batch of ``loader``: a report row and per-scenario metrics.
    Per-scene values stay on the device until the end: no batch waits for the one before."""
    metrics = ForecastMetrics().to(device)
    per_scene: list[dict[str, torch.Tensor]] = []
    ids: list[str] = []
    cities: list[str] = []
    for batch in progress_bar(loader, desc=f"eval {name}", unit="batch", disable=not progress, leave=False):
        batch = to_device(batch, device)
        y_hat, pi = predict(batch)
        y = batch["y"][:, 0]
        values = scene_metrics(y_hat, pi, y)  # once: the means' sums and the per-scenario rows
        metrics.update(y_hat, pi, y, values)
        per_scene.append({**values, FOCAL_TYPE: batch["x_attr"][:, 0, 0].clone(), MANOEUVRE: focal_manoeuvres(batch)})
        ids.extend(batch["scenario_id"])
        cities.extend(batch["city"])
    names = METRICS + MODE_COLUMNS + HORIZON_COLUMNS
    columns = {k: torch.cat([v[k] for v in per_scene]) if per_scene else torch.zeros(0) for k in names}
    frame = pd.DataFrame({k: v.cpu().numpy() for k, v in columns.items()})
    types = torch.cat([v[FOCAL_TYPE] for v in per_scene]).tolist() if per_scene else []
    manoeuvres = torch.cat([v[MANOEUVRE] for v in per_scene]).tolist() if per_scene else []
    frame.insert(0, CITY, cities)
    frame.insert(0, MANOEUVRE, [MANOEUVRES[m] for m in manoeuvres])
    frame.insert(0, FOCAL_TYPE, [OBJECT_TYPES[t] for t in types])
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
