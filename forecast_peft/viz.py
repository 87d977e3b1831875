"""Pictures of predictions: lanes, histories, the ground truth and the modes with probabilities."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from forecast_peft.constants import HISTORY_STEPS

PANEL_INCHES = 8.0
FRAME_MARGIN = 12.0  # metres around the focal agent's history, the modes and the ground truth
FRAME_LEAST = 50.0  # metres across a panel at the least


def draw_scene(
    batch: dict, index: int, forecasts: list[tuple[str, torch.Tensor, torch.Tensor]], path: str | Path, title: str = ""
) -> Path:
    """One PNG of scene ``index`` of a (CPU) batch in the focal agent's frame: a panel per
    forecast ``(label, y_hat [K, T, 2] metres, pi [K] logits)``, side by side on shared axes, each
    with the same lanes, histories and ground truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gt = batch["y"][index, 0].numpy() if "y" in batch else None
    history = batch["x_positions"][index, 0].numpy()[~batch["x_padding_mask"][index, 0, :HISTORY_STEPS].numpy()]
    shown = [y_hat.numpy().reshape(-1, 2) for _, y_hat, _ in forecasts] + [history, np.zeros((1, 2))]
    if gt is not None:
        shown.append(gt)  # the ground truth may run past the modes
    (x0, x1), (y0, y1) = frame(np.concatenate(shown))
    n = len(forecasts)
    size = (PANEL_INCHES * n, PANEL_INCHES + 0.6)  # the titles above the square panels
    fig, axes = plt.subplots(1, n, figsize=size, dpi=110, squeeze=False, layout="constrained")
    for ax, (label, y_hat, pi) in zip(axes[0], forecasts):
        _draw_context(ax, batch, index)
        _draw_modes(ax, y_hat, pi)
        if gt is not None:
            ax.plot(gt[:, 0], gt[:, 1], color="tab:red", lw=2.0, ls="--", zorder=7, label="ground truth")
        ax.set_aspect("equal")
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.legend(loc="upper left", fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("x along the focal heading (m)")
        ax.set_ylabel("y (m)")
    fig.suptitle(title or batch["scenario_id"][index], fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def frame(points: np.ndarray, margin: float = FRAME_MARGIN, least: float = FRAME_LEAST) -> tuple:
    """The square panel ((x0, x1), (y0, y1)) around ``points`` [P, 2] (the focal agent's history, the
    modes, the ground truth): centred on them, ``margin`` metres beyond the farthest, ``least``
    metres across at the least. A panel centred on the focal agent, as before, left most of itself
    empty: a 60 m forecast ahead made it 150 m across with everything in one half of it."""
    points = points[np.isfinite(points).all(-1)]
    if len(points) == 0:
        points = np.zeros((1, 2))
    low, high = points.min(0), points.max(0)
    centre = (low + high) / 2
    half = max(float((high - low).max()) / 2 + margin, least / 2)
    return (centre[0] - half, centre[0] + half), (centre[1] - half, centre[1] + half)


def _draw_context(ax, batch: dict, index: int) -> None:
    """Lanes and the actors' histories (the focal agent's in orange). The lanes and the other
    actors are drawn as one collection each: a line per lane and per actor (60-200 lanes in an
    AV2-sized scene) took most of a picture's time, 0.73 s for two panels against 0.40 s now
    (``benchmarks/bench_data.py``'s ``bench_pictures``)."""
    from matplotlib.collections import LineCollection

    lanes = batch["lane_positions"][index].numpy()
    lane_pad = batch["lane_padding_mask"][index].numpy()
    pos = batch["x_positions"][index].numpy()
    pad = batch["x_padding_mask"][index, :, :HISTORY_STEPS].numpy()
    actors = np.flatnonzero(~batch["x_key_padding_mask"][index].numpy())
    lines = [pts[~pm] for pts, pm in zip(lanes, lane_pad) if not pm.all()]
    ax.add_collection(LineCollection(lines, colors="0.8", linewidths=0.8, zorder=1), autolim=False)
    if 0 in actors:
        ax.plot(pos[0, ~pad[0], 0], pos[0, ~pad[0], 1], color="tab:orange", lw=2.0, zorder=3, label="focal history")
        ax.scatter(pos[0, -1, 0], pos[0, -1, 1], s=30, color="tab:orange", zorder=4)
    others = actors[actors != 0]
    if len(others):
        grey = "0.45"  # the modes' colour map holds blues and greens
        histories = [pos[a, ~pad[a]] for a in others]
        ax.add_collection(
            LineCollection(histories, colors=grey, linewidths=1.0, zorder=3, label="other actors"), autolim=False
        )
        ax.scatter(pos[others, -1, 0], pos[others, -1, 1], s=12, color=grey, zorder=4)


def _draw_modes(ax, y_hat: torch.Tensor, pi: torch.Tensor) -> None:
    """The modes, the most probable first in the colour map, each labelled with its probability."""
    import matplotlib.pyplot as plt

    probs = torch.softmax(pi.float(), dim=-1).numpy()
    order = np.argsort(-probs)
    cmap = plt.get_cmap("viridis")
    for rank, k in enumerate(order):
        traj = y_hat[k].numpy()
        color = cmap(rank / max(1, len(order) - 1))
        ax.plot(traj[:, 0], traj[:, 1], color=color, lw=1.5, zorder=5, label=f"mode {rank + 1}: p={probs[k]:.2f}")
        ax.scatter(traj[-1, 0], traj[-1, 1], s=14, color=color, zorder=6)
