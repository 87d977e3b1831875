"""Writing the Argoverse 2 on-disk format: a scenario's parquet file of tracks and its map JSON,
as `fpeft synth` and `fpeft convert` produce them (``av2_reader`` reads them back)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from forecast_peft.constants import (
    FOCAL_TRACK,
    HISTORY_STEPS,
    SCORED_TRACK,
    TRACK_FRAGMENT,
    UNSCORED_TRACK,
)
from forecast_peft.data.files import atomic_directory

MOVERS = frozenset({"vehicle", "pedestrian", "motorcyclist", "cyclist", "bus"})
# scored tracks: up to this many (the focal one counted among them), complete, moving, near it now
MAX_SCORED = 6
SCORED_RADIUS_M = 40.0
SCORED_MIN_SPEED = 0.3  # m/s now
UNSCORED_MIN_STEPS = 60  # steps a track must be seen to be more than a fragment

SCHEMA = pa.schema(
    [
        ("observed", pa.bool_()),
        ("track_id", pa.string()),
        ("object_type", pa.string()),
        ("object_category", pa.int64()),
        ("timestep", pa.int64()),
        ("position_x", pa.float64()),
        ("position_y", pa.float64()),
        ("heading", pa.float64()),
        ("velocity_x", pa.float64()),
        ("velocity_y", pa.float64()),
        ("scenario_id", pa.string()),
        ("start_timestamp", pa.float64()),
        ("end_timestamp", pa.float64()),
        ("num_timestamps", pa.int64()),
        ("focal_track_id", pa.string()),
        ("city", pa.string()),
        ("map_id", pa.uint64()),
        ("slice_id", pa.string()),
    ]
)


def track_categories(
    seen: np.ndarray, movers: np.ndarray, dist_now: np.ndarray, speed_now: np.ndarray, focal: int
) -> np.ndarray:
    """AV2's ``object_category`` of each track: focal 3; scored 2 (seen at every step, a mover,
    within 40 m of the focal agent and moving now: the first 6 such, the focal one among them);
    unscored 1 (seen at least 60 steps); a fragment 0 otherwise.

    Args:
        seen: [N, T] steps at which each track is observed; movers [N] bool;
        dist_now: [N] metres from the focal agent at the present step; speed_now: [N] m/s.
    """
    category = np.full(len(seen), TRACK_FRAGMENT)
    category[seen.sum(axis=1) >= UNSCORED_MIN_STEPS] = UNSCORED_TRACK
    scored = np.flatnonzero(seen.all(axis=1) & movers & (dist_now < SCORED_RADIUS_M) & (speed_now > SCORED_MIN_SPEED))
    category[scored[:MAX_SCORED]] = SCORED_TRACK
    category[focal] = FOCAL_TRACK
    return category


def _strings(values: list[str], index: np.ndarray) -> pa.Array:
    """``values[index]`` as an Arrow string column (Arrow's take: no Python string per row)."""
    return pa.array(values, type=pa.string()).take(pa.array(index, type=pa.int64()))


def scenario_table(
    agent: np.ndarray,
    step: np.ndarray,
    track_ids: list[str],
    object_types: list[str],
    category: np.ndarray,
    position: np.ndarray,
    heading: np.ndarray,
    velocity: np.ndarray,
    *,
    scenario_id: str,
    focal_id: str,
    city: str,
    start_ns: float,
    num_steps: int,
    map_id: int,
    slice_id: str,
) -> pa.Table:
    """A scenario parquet file's table, one row per (``agent``, ``step``) pair [R].

    Args:
        track_ids, object_types, category: per agent [N]; position [N, T, 2] and velocity
            [N, T, 2] in metres and m/s, heading [N, T] in radians, in the map's frame.
        start_ns: the time of step 0 in nanoseconds; num_steps: 110, or 50 for a test scenario.
    """
    rows = len(agent)
    once = np.zeros(rows, np.int64)
    columns = {
        "observed": step < HISTORY_STEPS,
        "track_id": _strings(track_ids, agent),
        "object_type": _strings(object_types, agent),
        "object_category": category[agent].astype(np.int64),
        "timestep": step.astype(np.int64),
        "position_x": position[agent, step, 0],
        "position_y": position[agent, step, 1],
        "heading": heading[agent, step],
        "velocity_x": velocity[agent, step, 0],
        "velocity_y": velocity[agent, step, 1],
        "scenario_id": _strings([scenario_id], once),
        "start_timestamp": np.full(rows, start_ns),
        "end_timestamp": np.full(rows, start_ns + (num_steps - 1) * 1e8),
        "num_timestamps": np.full(rows, num_steps, np.int64),
        "focal_track_id": _strings([focal_id], once),
        "city": _strings([city], once),
        "map_id": np.full(rows, map_id, np.uint64),
        "slice_id": _strings([slice_id], once),
    }
    arrays = [c if isinstance(c, pa.Array) else pa.array(c, type=SCHEMA.field(n).type) for n, c in columns.items()]
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def map_points(xy: np.ndarray, z: np.ndarray) -> list[dict]:
    """AV2 map points: [{"x", "y", "z"}, ...] rounded to centimetres like the real archives."""
    xyz = np.round(np.concatenate([xy, z[:, None]], axis=1), 2).tolist()
    return [{"x": x, "y": y, "z": h} for x, y, h in xyz]


def polyline_tangents(points: np.ndarray, first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Unit tangents of many polylines concatenated in ``points`` [P, 2] (central differences
    inside each polyline, one-sided at its ends); ``first`` and ``last`` index each one's ends."""
    fwd = np.zeros_like(points)
    fwd[:-1] = points[1:] - points[:-1]
    bwd = np.zeros_like(points)
    bwd[1:] = points[1:] - points[:-1]
    fwd[last] = 0.0
    bwd[first] = 0.0
    t = fwd + bwd
    return t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-9)


def write_scenario(split_dir: Path, table: pa.Table, map_data: dict, hint: str) -> Path:
    """Write ``<split_dir>/<id>/scenario_<id>.parquet`` (``scenario_table``) and
    ``log_map_archive_<id>.json`` atomically; ``hint`` says what to do when the disk is full."""
    scenario_id = table.column("scenario_id")[0].as_py()
    final = split_dir / scenario_id
    with atomic_directory(final, "the scenario", hint) as tmp:
        pq.write_table(table, tmp / f"scenario_{scenario_id}.parquet")
        (tmp / f"log_map_archive_{scenario_id}.json").write_bytes(orjson.dumps(map_data))
    return final


def scenario_written(final: Path) -> bool:
    """Whether a scenario folder holds both of its files (a re-run leaves it as it is)."""
    return final.is_dir() and any(final.glob("scenario_*.parquet")) and any(final.glob("log_map_archive_*.json"))
