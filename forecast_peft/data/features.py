"""Model inputs derived from a scene's local-frame tracks, shared by extraction and batching.

Every function works on any number of leading dimensions ([A, T, ...] for one scene or
[B, N, T, ...] for a batch), so a single scenario and a padded batch get the same meaning.
"""

from __future__ import annotations

import numpy as np

from forecast_peft.constants import CURRENT_STEP, FUTURE_STEPS, HISTORY_STEPS

# Per-actor and per-lane arrays of a scene's features (FORECAST_MAE.md), in that order.
ACTOR_FEATURES = (
    "x",
    "y",
    "x_attr",
    "x_positions",
    "x_centers",
    "x_angles",
    "x_velocity",
    "x_velocity_diff",
    "x_padding_mask",
)
LANE_FEATURES = ("lane_positions", "lane_centers", "lane_angles", "lane_attr", "lane_padding_mask", "is_intersections")
# Everything ``extract`` returns.
FEATURE_KEYS = ACTOR_FEATURES + LANE_FEATURES + ("origin", "theta", "scenario_id", "track_id", "city")


def derive_actor_features(
    positions: np.ndarray,
    velocity: np.ndarray,
    padding_mask: np.ndarray,
    with_future: bool = True,
    out: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Displacements, centres and targets of the Forecast-MAE convention.

    Args:
        positions: [..., 110, 2] local-frame positions in metres (anything where padded).
        velocity: [..., 110] speed in m/s.
        padding_mask: [..., 110] True where the track has no row (or its future is not a target).
        with_future: False for the test split: no ``y``.
        out: arrays to write the results into (C-contiguous, of the shapes below); new ones
            are made for the keys it lacks.
    Returns:
        x [..., 50, 2] per-step displacement, x_positions [..., 50, 2], x_centers [..., 2],
        x_velocity_diff [..., 50], and y [..., 60, 2] (future minus the position now) or None.
    """
    lead = positions.shape[:-2]
    out = {} if out is None else out

    def target(key: str, shape: tuple) -> np.ndarray:
        if key not in out:
            out[key] = np.empty(lead + shape, np.float32)
        return out[key]

    # Points as complex numbers ([..., T] complex64 views of [..., T, 2] float32): numpy's
    # broadcasting over a trailing axis of length 2 is slow, and this runs on every batch.
    pts = np.ascontiguousarray(positions, dtype=np.float32).view(np.complex64)[..., 0]  # [..., 110]
    hist = pts[..., :HISTORY_STEPS]
    hist_valid = ~padding_mask[..., :HISTORY_STEPS]
    step_valid = hist_valid[..., :-1] & hist_valid[..., 1:]  # [..., 49]
    x = _as_complex(target("x", (HISTORY_STEPS, 2)))
    x[...] = 0
    np.subtract(hist[..., 1:], hist[..., :-1], out=x[..., 1:], where=step_valid)
    speed = velocity[..., :HISTORY_STEPS]
    x_velocity_diff = target("x_velocity_diff", (HISTORY_STEPS,))
    x_velocity_diff[...] = 0
    np.subtract(speed[..., 1:], speed[..., :-1], out=x_velocity_diff[..., 1:], where=step_valid)
    x_positions = _as_complex(target("x_positions", (HISTORY_STEPS, 2)))
    x_positions[...] = 0
    np.copyto(x_positions, hist, where=hist_valid)
    target("x_centers", (2,))[...] = positions[..., CURRENT_STEP, :]
    if not with_future:
        out.setdefault("y", None)
    else:
        fut_valid = ~(padding_mask[..., HISTORY_STEPS:] | padding_mask[..., CURRENT_STEP : CURRENT_STEP + 1])
        y = _as_complex(target("y", (FUTURE_STEPS, 2)))
        y[...] = 0
        np.subtract(pts[..., HISTORY_STEPS:], pts[..., CURRENT_STEP : CURRENT_STEP + 1], out=y, where=fut_valid)
    return out


def _as_complex(points: np.ndarray) -> np.ndarray:
    """[..., T, 2] float32 (C-contiguous) -> [..., T] complex64 (a view)."""
    return points.view(np.complex64)[..., 0]
