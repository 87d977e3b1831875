"""The lane-following baseline: the focal agent follows the lane centrelines it can be on, through
the lanes that continue them (straight on, a turn at a junction), at its speed or speeding up,
braking or slowing down (``_plans``). A map-aware reference for the K=6 metrics: a learned
model that does not beat it has learned less than "follow the lane"."""

from __future__ import annotations

import numpy as np
import torch

from forecast_peft.constants import FUTURE_STEPS, HZ, NUM_MODES

START_M = 2.5  # a lane whose centreline passes this close to the focal agent is one it may follow
START_COS = 0.5  # ... if it runs within 60 degrees of the agent's heading
SUCCESSOR_GAP_M = 1.5  # a lane that starts this close to where another ends continues it
SUCCESSOR_COS = 0.7  # ... if it leaves within 45 degrees of that lane's last direction
MAX_WAYS = 12  # ways through the lanes looked at per scene; the modes take the first two
# the speed changes of the modes after constant speed (m/s^2): speed up, brake, slow down
SPEED_CHANGES = (1.0, -3.0, -1.0)


def lane_following(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """y_hat [B, 6, 60, 2] (metres, focal frame) and scores [B, 6]. A scene whose focal agent is
    on no lane (a pedestrian, a car park) gets ``kinematic_modes``' trajectories. The lanes are
    walked on the host, scene by scene (a baseline's loop, not a network's: on a GPU each batch
    waits for its copy to the host)."""
    from forecast_peft.evaluation import kinematic_heading, kinematic_modes  # evaluation lists this baseline

    trajectories, scores = kinematic_modes(batch)
    per_step, heading = kinematic_heading(batch)  # [B, 2] m per step, [B] rad
    speed = (per_step * HZ).norm(dim=-1).double().cpu().numpy()  # m/s
    heading = heading.double().cpu().numpy()
    points = batch["lane_positions"].double().cpu().numpy()  # [B, M, 20, 2]
    valid = ~(batch["lane_padding_mask"] | batch["lane_key_padding_mask"][..., None]).cpu().numpy()
    out = trajectories.double().cpu().numpy()
    t = np.arange(1, FUTURE_STEPS + 1) / HZ  # [T] s
    for b in range(len(speed)):
        distance = _distances(speed[b], t)  # [1 + len(SPEED_CHANGES), T] metres along the way
        ways = lane_ways(points[b], valid[b], np.array([np.cos(heading[b]), np.sin(heading[b])]), distance.max())
        if not ways:
            continue
        plans = _plans(ways)
        for k, (way, profile) in enumerate(plans[:NUM_MODES]):
            out[b, k] = along(way, distance[profile])
    # kinematic_modes' scores: the first mode (here the nearest lane at constant speed) highest
    return torch.as_tensor(out, dtype=trajectories.dtype, device=trajectories.device), scores


def _plans(ways: list[np.ndarray]) -> list[tuple[np.ndarray, int]]:
    """(way, speed profile: 0 constant, else 1 + its index in ``SPEED_CHANGES``) of each mode,
    most likely first: the first way at constant speed, the second way at constant speed, the
    first way with each speed change, the second way speeding up (six modes where there are two
    ways, four where there is one). On the demo's synthetic validation scenes this choice
    scored best of those tried: three ways at constant speed, or the speed changes shared
    between two ways, missed more often."""
    first, second = ways[0], ways[1:2]
    plans = [(first, 0)] + [(way, 0) for way in second] + [(first, c + 1) for c in range(len(SPEED_CHANGES))]
    return plans + [(way, 1) for way in second]


def _distances(speed: float, t: np.ndarray) -> np.ndarray:
    """Metres travelled by each step at constant speed, then with each of ``SPEED_CHANGES``
    (never backwards): [1 + len(SPEED_CHANGES), T]."""
    accel = np.array((0.0,) + SPEED_CHANGES)[:, None]
    stop = np.where(accel < 0, speed / np.maximum(-accel, 1e-9), np.inf)  # when a braking agent stands
    moving = np.minimum(t[None], stop)
    return speed * moving + 0.5 * accel * moving**2


def lane_ways(points: np.ndarray, valid: np.ndarray, heading: np.ndarray, length: float) -> list[np.ndarray]:
    """The ways an agent at the origin heading along ``heading`` [2] can follow through the lanes
    ``points`` [M, 20, 2] (``valid`` [M, 20]; a lane's valid points are one run, as the 150 m box
    cuts them): polylines [P, 2] from the agent's projection onto a lane it may be on, through the
    lanes that continue it, until ``length`` metres or the lanes run out; the nearest lane's
    first, then in order of how straight each continuation leaves."""
    step = points[:, 1:] - points[:, :-1]  # [M, 19, 2]
    norm = np.linalg.norm(step, axis=-1)
    segment = valid[:, 1:] & valid[:, :-1] & (norm > 1e-6)  # [M, 19]
    usable = segment.any(axis=1)
    if not usable.any():
        return []
    direction = step / np.maximum(norm, 1e-12)[..., None]
    first_seg = segment.argmax(axis=1)  # [M]
    last_seg = segment.shape[1] - 1 - segment[:, ::-1].argmax(axis=1)
    rows = np.arange(len(points))
    first, last = points[rows, first_seg], points[rows, last_seg + 1]  # [M, 2]
    first_dir, last_dir = direction[rows, first_seg], direction[rows, last_seg]
    near = np.linalg.norm(last[:, None] - first[None], axis=-1) <= SUCCESSOR_GAP_M  # [M, M]: m ends where m' starts
    straight = last_dir @ first_dir.T  # [M, M]
    successors = near & (straight >= SUCCESSOR_COS) & usable[:, None] & usable[None]
    np.fill_diagonal(successors, False)
    # the agent (the origin) projected onto every segment
    u = np.clip(-(points[:, :-1] * step).sum(-1) / np.maximum(norm**2, 1e-12), 0.0, 1.0)  # [M, 19]
    gap = np.where(segment, np.linalg.norm(points[:, :-1] + u[..., None] * step, axis=-1), np.inf)
    seg = gap.argmin(axis=1)
    aligned = direction[rows, seg] @ heading >= START_COS
    starts = np.flatnonzero((gap[rows, seg] <= START_M) & aligned)
    ways: list[np.ndarray] = []
    for m in starts[np.argsort(gap[starts, seg[starts]], kind="stable")]:
        j = seg[m]
        head = np.concatenate([(points[m, j] + u[m, j] * step[m, j])[None], _run(points[m], segment[m], j + 1)])
        stack = [(m, head, {m})]
        while stack and len(ways) < MAX_WAYS:
            lane, way, seen = stack.pop()
            ahead = [n for n in np.flatnonzero(successors[lane]) if n not in seen]
            if _length(way) >= length or not ahead:
                same = next((i for i, w in enumerate(ways) if _same_way(way, w, length)), None)
                if same is None:
                    ways.append(way)
                elif _length(way) > _length(ways[same]):  # the same way, on lanes that go further
                    ways[same] = way
                continue
            # the straightest continuation is taken first: pushed last
            for n in sorted(ahead, key=lambda n: straight[lane, n]):
                stack.append((n, np.concatenate([way, _run(points[n], segment[n], first_seg[n] + 1)]), seen | {n}))
    return ways


def _run(points: np.ndarray, segment: np.ndarray, start: int) -> np.ndarray:
    """A lane's points [P, 2] from point ``start`` to its last valid one (``segment`` [19]: its
    valid segments, one run)."""
    end = len(segment) - segment[::-1].argmax() + 1  # one past the last valid point
    return points[start:end]


def along(way: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """The points [T, 2] ``distance`` [T] metres along the polyline ``way`` [P, 2]; past its end,
    straight on along its last direction."""
    steps = np.linalg.norm(np.diff(way, axis=0), axis=-1)
    reach = np.concatenate([[0.0], np.cumsum(steps)])
    x = np.interp(distance, reach, way[:, 0])
    y = np.interp(distance, reach, way[:, 1])
    beyond = np.maximum(distance - reach[-1], 0.0)[:, None]
    moved = np.flatnonzero(steps > 1e-9)  # the last direction: of the last segment of some length
    last = _unit(way[moved[-1] + 1] - way[moved[-1]]) if len(moved) else np.zeros(2)
    return np.stack([x, y], -1) + beyond * last


def _same_way(a: np.ndarray, b: np.ndarray, length: float) -> bool:
    """Two ways that end within a metre of each other ``length`` metres on (two lanes drawn over
    each other) are one mode."""
    end = np.array([min(length, _length(a), _length(b))])
    return float(np.linalg.norm(along(a, end) - along(b, end))) < 1.0


def _length(line: np.ndarray) -> float:
    return float(np.linalg.norm(np.diff(line, axis=0), axis=-1).sum())


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)
