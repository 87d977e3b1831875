"""Scene statistics of a dataset split, to compare synthetic data with real AV2 scenes."""

from __future__ import annotations

import sys
from collections import deque
from pathlib import Path

import numpy as np
import pandas as pd

from forecast_peft.constants import CURRENT_STEP, FUTURE_STEPS, HZ, MISS_THRESHOLD_M, RADIUS_M, TURN_RAD
from forecast_peft.data.preprocess import scenario_dirs
from forecast_peft.errors import UserError, count

SUCCESSOR_DEPTH = 12


def _nearest_lane(static_map, xy: np.ndarray, heading: float) -> int | None:
    """Id of the lane whose centreline passes closest to ``xy`` going roughly along ``heading``."""
    best, best_d = None, np.inf
    for lane in static_map.vector_lane_segments.values():
        c = (lane.left_lane_boundary.xyz[:, :2].mean(0) + lane.right_lane_boundary.xyz[:, :2].mean(0)) / 2
        if np.abs(c - xy).max() > 80:
            continue
        from av2.geometry.interpolate import compute_midpoint_line

        mid, _ = compute_midpoint_line(lane.left_lane_boundary.xyz[:, :2], lane.right_lane_boundary.xyz[:, :2], 10)
        d = np.linalg.norm(mid - xy, axis=1)
        k = int(np.argmin(d))
        seg = mid[min(k + 1, 9)] - mid[max(k - 1, 0)]
        along = np.cos(np.arctan2(seg[1], seg[0]) - heading)
        if along > 0.5 and d[k] < best_d:
            best, best_d = lane.id, d[k]
    return best if best_d < 3.0 else None


def _reachable(static_map, start: int, goal: int) -> bool:
    seen, queue = {start}, deque([(start, 0)])
    while queue:
        lane, depth = queue.popleft()
        if lane == goal:
            return True
        if depth < SUCCESSOR_DEPTH and lane in static_map.vector_lane_segments:
            for nxt in static_map.vector_lane_segments[lane].successors:
                if nxt not in seen:
                    seen.add(nxt)
                    queue.append((nxt, depth + 1))
    return False


def scene_stats(scenario_dir: Path) -> dict:
    """Actors and lanes in range now, focal speed, whether the focal turns or changes lane in
    its future (lane graph: its lane at 6 s is not reached from its lane now by successors), and
    the constant-velocity forecast's final error."""
    from forecast_peft.data.av2_reader import extract, load_map, scenario_files

    f = extract(scenario_dir, split="val")
    df = pd.read_parquet(scenario_files(scenario_dir)[0], columns=["track_id", "timestep", "position_x", "position_y"])
    now = df[df.timestep == CURRENT_STEP]
    dist = np.hypot(now.position_x - f["origin"][0, 0], now.position_y - f["origin"][0, 1])
    speed = float(f["x_velocity"][0, CURRENT_STEP])
    y = f["y"][0]
    dtheta = abs(float(f["x_angles"][0, -1]))
    turn = dtheta > TURN_RAD
    lane_change = False
    if not turn:
        static_map = load_map(scenario_files(scenario_dir)[1])
        c, s = np.cos(f["theta"]), np.sin(f["theta"])
        rot = np.array([[c, -s], [s, c]])
        world_end = f["origin"][0] + y[-1] @ rot.T
        a = _nearest_lane(static_map, f["origin"][0], float(f["theta"]))
        b = _nearest_lane(static_map, world_end, float(f["theta"] + f["x_angles"][0, -1]))
        lane_change = a is not None and b is not None and not _reachable(static_map, a, b)
    # constant velocity along the focal's heading now, at its speed now
    cv_end = np.array([speed * FUTURE_STEPS / HZ, 0.0])
    return {
        "actors_150m": int((dist <= RADIUS_M).sum()),
        "lanes_box": int(len(f["lane_positions"])),
        "focal_speed": speed,
        "turn": bool(turn),
        "lane_change": bool(lane_change),
        "cv_fde": float(np.linalg.norm(cv_end - y[-1])),
        "city": str(f["city"]),
    }


def collect(split_dir: str | Path, limit: int | None = None) -> pd.DataFrame:
    """``scene_stats`` of every scenario of a split directory (the first ``limit``); a scenario
    that cannot be read is skipped with a line that says why."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise UserError(f"{split_dir} is not a directory of scenarios")
    splits = [name for name in ("train", "val", "test") if (split_dir / name).is_dir()]
    if splits:
        raise UserError(f"{split_dir} is a data root: give one of its splits, such as {split_dir / splits[0]}")
    dirs = [Path(d) for d in scenario_dirs(split_dir)[:limit]]
    if not dirs:
        raise UserError(f"{split_dir} holds no scenario directories")
    from forecast_peft.data.av2_reader import failure_reason

    rows = []
    for d in dirs:
        try:
            rows.append(scene_stats(d))
        except Exception as err:  # a batch job reports what it cannot read and goes on
            print(f"skipped {d}: {failure_reason(err)}", file=sys.stderr)
    if not rows:
        raise UserError(f"none of the {len(dirs):,} scenario folders of {split_dir} could be read")
    return pd.DataFrame(rows)


def summarize(table: pd.DataFrame) -> dict:
    return {
        "scenarios": len(table),
        "actors_150m": table.actors_150m.describe(percentiles=[0.05, 0.5, 0.95]).round(1).to_dict(),
        "lanes_box": table.lanes_box.describe(percentiles=[0.05, 0.5, 0.95]).round(1).to_dict(),
        "focal_speed": table.focal_speed.describe(percentiles=[0.05, 0.5, 0.95]).round(2).to_dict(),
        "stopped_focal_share": float((table.focal_speed < 0.5).mean()),
        "turn_share": float(table.turn.mean()),
        "lane_change_share": float(table.lane_change.mean()),
        "turn_or_lane_change_share": float((table.turn | table.lane_change).mean()),
        "cv_miss_share": float((table.cv_fde > MISS_THRESHOLD_M).mean()),
        "cities": {str(k): int(v) for k, v in table.city.value_counts(sort=True).items()},
    }


def print_stats(split_dir: str | Path) -> dict:
    summary = summarize(collect(split_dir))
    keep = ("min", "5%", "50%", "95%", "max")
    print(f"{split_dir}: {count(summary['scenarios'], 'scenario')}")
    for key in ("actors_150m", "lanes_box", "focal_speed"):
        print(f"  {key:<26}" + "  ".join(f"{k} {summary[key][k]:g}" for k in keep))
    for key in ("stopped_focal_share", "turn_share", "lane_change_share", "turn_or_lane_change_share", "cv_miss_share"):
        print(f"  {key:<26}{summary[key]:.2f}")
    print(f"  {'cities':<26}" + ", ".join(f"{city} {n:,}" for city, n in summary["cities"].items()))
    return summary
