"""Reading raw Argoverse 2 scenarios: the only module that imports av2.

``extract`` reproduces the Forecast-MAE single-agent features (see FORECAST_MAE.md) with the
per-lane av2 helpers (``get_nearby_lane_segments``, ``compute_midpoint_line``) replaced by the
same arithmetic vectorised over all lane segments at once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from forecast_peft.constants import (
    COMBINED_TYPE,
    CURRENT_STEP,
    HISTORY_STEPS,
    LANE_POINTS,
    LANE_TYPE_INDEX,
    NO_FUTURE_TYPES,
    OBJECT_TYPE_INDEX,
    OUTLIER_LANE_DIST_M,
    RADIUS_M,
    TOTAL_STEPS,
)
from forecast_peft.data.features import derive_actor_features
from forecast_peft.errors import reason_of

COLUMNS = [
    "track_id",
    "object_type",
    "object_category",
    "timestep",
    "position_x",
    "position_y",
    "heading",
    "velocity_x",
    "velocity_y",
    "scenario_id",
    "focal_track_id",
    "city",
]
SCENARIO_COLUMNS = ("scenario_id", "focal_track_id", "city")
# av2 samples each lane boundary at this many points to decide whether a lane is nearby.
NEARBY_INTERP_POINTS = 50


class ScenarioError(Exception):
    """A scenario that cannot be turned into features; ``str`` names the file and the reason."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def failure_reason(err: Exception) -> str:
    """Why a scenario could not be read, for a batch job's line about skipping it: a
    ``ScenarioError``'s reason, else the exception's type and message."""
    return err.reason if isinstance(err, ScenarioError) else f"{type(err).__name__}: {err}"


def scenario_files(path: str | Path) -> tuple[Path, Path]:
    """The parquet and map file of a scenario directory (or of its parquet file)."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("scenario_*.parquet"))
        if not found:
            inner = next(path.glob("*/scenario_*.parquet"), None)  # split parts unpacked into folders of their own
            nested = (
                f"; it holds scenario folders ({inner.parent.name}/ and maybe more): AV2 keeps each scenario "
                f"folder directly in the split folder, so move them up into {path.parent}"
                if inner is not None
                else ""
            )
            raise ScenarioError(path, "no scenario_*.parquet file in the directory" + nested)
        parquet = found[0]
    elif path.exists():
        parquet = path
    else:
        raise ScenarioError(path, "no such file or directory")
    maps = sorted(parquet.parent.glob("log_map_archive_*.json"))
    if not maps:
        raise ScenarioError(parquet.parent, "missing map file log_map_archive_*.json")
    return parquet, maps[0]


def interp_polylines(points: np.ndarray, lengths: np.ndarray, num: int) -> np.ndarray:
    """``av2.geometry.interpolate.interp_arc`` for many polylines at once.

    Args:
        points: [P, K, D] polylines padded to K points (any values after ``lengths``).
        lengths: [P] number of real points of each polyline (>= 2).
        num: points to return per polyline, evenly spaced in chordal arc length.
    Returns:
        [P, num, D] interpolated points, the same arithmetic as av2's per-polyline function.
    """
    num_poly, max_len, _ = points.shape
    real = np.arange(max_len)[None, :] < lengths[:, None]  # [P, K]
    chord = np.linalg.norm(np.diff(points, axis=1), axis=-1)  # [P, K-1]
    chord = np.where(real[:, 1:], chord, 0.0)
    chord = chord / chord.sum(axis=1, keepdims=True)
    cumarc = np.zeros((num_poly, max_len))
    cumarc[:, 1:] = np.cumsum(chord, axis=1)
    cumarc = np.where(real, cumarc, 2.0)  # beyond any t in [0, 1]
    t = np.linspace(0, 1, num)
    tbins = (cumarc[:, None, :] <= t[None, :, None]).sum(axis=-1)  # np.digitize, [P, num]
    last = (lengths - 1)[:, None]
    tbins = np.where((tbins <= 0) | (t[None, :] <= 0), 1, tbins)
    tbins = np.where((tbins >= lengths[:, None]) | (t[None, :] >= 1), last, tbins)
    rows = np.arange(num_poly)[:, None]
    s = (t[None, :] - cumarc[rows, tbins - 1]) / chord[rows, tbins - 1]
    anchors = points[rows, tbins - 1]
    return anchors + (points[rows, tbins] - anchors) * s[..., None]


def _boundaries(segments) -> tuple[np.ndarray, np.ndarray]:
    """Left and right boundaries of all segments as [2S, K, 3] (padded with the last point) and
    their lengths [2S]; rows 0..S-1 are left boundaries, S..2S-1 right ones."""
    polys = [s.left_lane_boundary.waypoints for s in segments] + [s.right_lane_boundary.waypoints for s in segments]
    lengths = np.array([len(p) for p in polys])
    flat = np.array([(w.x, w.y, w.z) for p in polys for w in p], dtype=np.float64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    k = np.minimum(np.arange(lengths.max())[None, :], (lengths - 1)[:, None])
    return flat[starts[:, None] + k], lengths


def _interp_or_raw(points: np.ndarray, lengths: np.ndarray, num: int) -> np.ndarray:
    """Interpolate all polylines; as in av2, a polyline that cannot be interpolated (a single
    point) is used as it is (repeated to ``num`` points, which leaves the test unchanged)."""
    single = lengths < 2
    if not single.any():
        return interp_polylines(points, lengths, num)
    out = np.repeat(points[:, :1], num, axis=1)
    if (~single).any():
        out[~single] = interp_polylines(points[~single], lengths[~single], num)
    return out


def load_map(map_path: Path, lanes_only: bool = False):
    """``ArgoverseStaticMap.from_json`` with a faster JSON parser (orjson), same objects;
    ``lanes_only`` skips the drivable areas and crosswalks (feature extraction needs lanes only)."""
    import orjson
    from av2.map.drivable_area import DrivableArea
    from av2.map.lane_segment import LaneSegment
    from av2.map.map_api import ArgoverseStaticMap
    from av2.map.pedestrian_crossing import PedestrianCrossing

    try:
        data = orjson.loads(map_path.read_bytes())
        areas = {} if lanes_only else {d["id"]: DrivableArea.from_dict(d) for d in data["drivable_areas"].values()}
        crossings = (
            {}
            if lanes_only
            else {c["id"]: PedestrianCrossing.from_dict(c) for c in data.get("pedestrian_crossings", {}).values()}
        )
        return ArgoverseStaticMap(
            log_id=map_path.stem.split("log_map_archive_")[-1],
            vector_drivable_areas=areas,
            vector_lane_segments={s["id"]: LaneSegment.from_dict(s) for s in data["lane_segments"].values()},
            vector_pedestrian_crossings=crossings,
            raster_drivable_area_layer=None,
            raster_roi_layer=None,
            raster_ground_height_layer=None,
        )
    except Exception as err:  # orjson/KeyError/ValueError from a broken file
        raise ScenarioError(map_path, f"unreadable map ({type(err).__name__}: {err})") from None


def nearby_segments(bounds: np.ndarray, lengths: np.ndarray, center: np.ndarray, radius: float) -> np.ndarray:
    """Indices of the segments ``get_nearby_lane_segments`` returns: any of 50 arc-length samples
    of either 2-D boundary within ``radius`` of ``center`` (L-inf). A boundary whose vertices all lie
    inside the (convex) box has every sample inside, so only the others are sampled.

    Args:
        bounds: [2S, K, 3] left boundaries then right ones (``_boundaries``); lengths [2S].
    """
    near = (np.abs(bounds[..., :2] - center).max(axis=-1) < radius).all(axis=1)
    rest = np.flatnonzero(~near)
    if len(rest):
        sampled = _interp_or_raw(bounds[rest, :, :2], lengths[rest], NEARBY_INTERP_POINTS)
        near[rest] = np.abs(sampled - center).max(axis=-1).min(axis=-1) < radius
    num_seg = len(near) // 2
    return np.flatnonzero(near[:num_seg] | near[num_seg:])


def lane_features(static_map, origin: np.ndarray, rotate: np.ndarray, radius: float = RADIUS_M) -> dict:
    """Lane centrelines in the local frame, as ``get_lane_features`` of Forecast-MAE.

    Args:
        static_map: ``ArgoverseStaticMap``.
        origin: [2] float32 world position of the focal agent now.
        rotate: [2, 2] float32 rotation; local = (world - origin) @ rotate.
    """
    from av2.geometry.interpolate import compute_midpoint_line

    segments = list(static_map.vector_lane_segments.values())
    if not segments:
        return _empty_lanes()
    bounds, lengths = _boundaries(segments)
    num_seg = len(segments)
    idx = nearby_segments(bounds, lengths, origin, radius)
    if len(idx) == 0:
        return _empty_lanes()
    both = np.concatenate([idx, idx + num_seg])
    if lengths[both].min() >= 2:
        # compute_midpoint_line on 3-D boundaries: midpoints and mean 3-D width.
        even = interp_polylines(bounds[both], lengths[both], LANE_POINTS)
        le, re = even[: len(idx)], even[len(idx) :]
        centre = ((le + re) / 2.0)[..., :2]
        width = np.linalg.norm(le - re, axis=-1).mean(axis=-1)
    else:  # cul-de-sac lanes with a single-point boundary: av2's own pivot rule
        pairs = [
            compute_midpoint_line(bounds[i, : lengths[i]], bounds[i + num_seg, : lengths[i + num_seg]], LANE_POINTS)
            for i in idx
        ]
        centre = np.stack([c[:, :2] for c, _ in pairs])
        width = np.array([w for _, w in pairs])
    pos = (centre.astype(np.float32) - origin) @ rotate  # [L, 20, 2]
    lane_type = np.array([LANE_TYPE_INDEX[segments[i].lane_type.value] for i in idx], dtype=np.float32)
    is_inter = np.array([segments[i].is_intersection for i in idx], dtype=np.float32)
    centers = pos[:, 9:11].mean(axis=1)
    angles = np.arctan2(pos[:, 10, 1] - pos[:, 9, 1], pos[:, 10, 0] - pos[:, 9, 0])
    attr = np.stack([lane_type, width.astype(np.float32), is_inter], axis=-1)
    pad = (np.abs(pos) > radius).any(axis=-1)  # [L, 20]
    keep = ~pad.all(axis=-1)
    pos = np.where(pad[..., None], np.float32(0.0), pos)
    return {
        "lane_positions": pos[keep].astype(np.float32),
        "lane_centers": centers[keep].astype(np.float32),
        "lane_angles": angles[keep].astype(np.float32),
        "lane_attr": attr[keep].astype(np.float32),
        "lane_padding_mask": pad[keep],
        "is_intersections": is_inter[keep],
    }


def _empty_lanes() -> dict:
    return {
        "lane_positions": np.zeros((0, LANE_POINTS, 2), np.float32),
        "lane_centers": np.zeros((0, 2), np.float32),
        "lane_angles": np.zeros((0,), np.float32),
        "lane_attr": np.zeros((0, 3), np.float32),
        "lane_padding_mask": np.zeros((0, LANE_POINTS), bool),
        "is_intersections": np.zeros((0,), np.float32),
    }


def _read_tracks(parquet: Path) -> dict[str, np.ndarray]:
    try:
        table = pq.read_table(parquet, columns=COLUMNS)
    except (pa.ArrowException, OSError) as err:
        raise ScenarioError(parquet, f"unreadable parquet ({reason_of(err)})") from None
    except KeyError as err:
        raise ScenarioError(parquet, f"missing column {err}") from None
    if table.num_rows == 0:
        raise ScenarioError(parquet, "no rows")
    # per-scenario constants: only their first value is read
    first = {name: table.column(name)[0].as_py() for name in SCENARIO_COLUMNS}
    # a column's chunks are copied into one array (pyarrow before 13 takes no zero_copy_only here)
    return {name: table.column(name).to_numpy() for name in COLUMNS if name not in first} | first


def read_local_scene(path: str | Path, split: str = "val") -> dict:
    """The storage form of a scenario: local-frame tracks and lanes, before derived features.

    Raises:
        ScenarioError: naming the file and why it cannot be used.
    """
    parquet, map_path = scenario_files(path)
    cols = _read_tracks(parquet)
    steps_expected = HISTORY_STEPS if split == "test" else TOTAL_STEPS
    timestep = cols["timestep"].astype(np.int64)
    steps = np.unique(timestep)
    if len(steps) != steps_expected or steps[0] != 0 or steps[-1] != steps_expected - 1:
        # a scenario of the other kind in a split: the test split holds the history alone
        kinds = {
            TOTAL_STEPS: " (a scenario with its future, as train and val hold)",
            HISTORY_STEPS: " (a test scenario)",
        }
        kind = kinds.get(len(steps), "") if steps[0] == 0 else ""
        raise ScenarioError(
            parquet,
            f"wrong number of steps: found {len(steps)} (from {steps.min()} to {steps.max()}){kind}, "
            f"expected {steps_expected} (0 to {steps_expected - 1}) for the {split} split",
        )
    focal = str(cols["focal_track_id"])
    track_id = cols["track_id"].astype(str)
    is_focal = track_id == focal
    if not is_focal.any():
        raise ScenarioError(parquet, f"no focal track (focal_track_id {focal} has no rows)")
    now = timestep == CURRENT_STEP
    focal_now = np.flatnonzero(is_focal & now)
    if len(focal_now) == 0:
        raise ScenarioError(parquet, f"focal track {focal} not observed at step {CURRENT_STEP}")
    pos64 = np.stack([cols["position_x"], cols["position_y"]], axis=-1).astype(np.float64)
    numeric = np.concatenate(
        [pos64, cols["heading"][:, None], cols["velocity_x"][:, None], cols["velocity_y"][:, None]], 1
    )
    finite = np.isfinite(numeric).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)[0]
        raise ScenarioError(
            parquet, f"NaN/inf position, heading or velocity (track {track_id[bad]}, step {timestep[bad]})"
        )
    static_map = load_map(map_path, lanes_only=True)

    # The frame, in float32 like the published extractor.
    pos = pos64.astype(np.float32)
    heading = cols["heading"].astype(np.float32)
    origin = pos[focal_now[0]]
    theta = heading[focal_now[0]]
    c, s = np.cos(theta), np.sin(theta)
    rotate = np.array([[c, -s], [s, c]], dtype=np.float32)

    # Actors observed now, within the radius; focal first, then in row order at step 49.
    now_rows = np.flatnonzero(now)
    now_ids = list(dict.fromkeys(track_id[now_rows]))
    first_row = {tid: r for r, tid in zip(now_rows[::-1], track_id[now_rows][::-1])}
    near = [t for t in now_ids if np.linalg.norm(pos[first_row[t]] - origin) <= RADIUS_M and t != focal]
    actor_ids = [focal] + near
    row_actor = pd.Index(actor_ids).get_indexer(track_id)
    rows = np.flatnonzero(row_actor >= 0)
    a, ts = row_actor[rows], timestep[rows]

    num = len(actor_ids)
    positions = np.zeros((num, TOTAL_STEPS, 2), np.float32)
    angles = np.zeros((num, TOTAL_STEPS), np.float32)
    speed = np.zeros((num, TOTAL_STEPS), np.float32)
    padding = np.ones((num, TOTAL_STEPS), bool)
    attr = np.zeros((num, 3), np.uint8)
    positions[a, ts] = (pos[rows] - origin) @ rotate
    angles[a, ts] = (heading[rows] - theta + np.float32(np.pi)) % np.float32(2 * np.pi) - np.float32(np.pi)
    vel = np.stack([cols["velocity_x"][rows], cols["velocity_y"][rows]], -1).astype(np.float32)
    speed[a, ts] = np.linalg.norm(vel, axis=-1)
    padding[a, ts] = False
    # The first row of each actor gives its type and category.
    first = np.unique(a, return_index=True)[1]
    types = cols["object_type"][rows[first]].astype(str)
    unknown = sorted(set(types) - set(OBJECT_TYPE_INDEX))
    if unknown:
        raise ScenarioError(parquet, f"unknown object_type {unknown[0]!r}")
    attr[a[first], 0] = [OBJECT_TYPE_INDEX[t] for t in types]
    attr[a[first], 1] = cols["object_category"][rows[first]].astype(np.uint8)
    attr[a[first], 2] = [COMBINED_TYPE.get(t, 3) for t in types]
    no_future = padding[:, CURRENT_STEP].copy()
    no_future[a[first]] |= np.array([t in NO_FUTURE_TYPES for t in types])
    padding[no_future, HISTORY_STEPS:] = True

    lanes = lane_features(static_map, origin, rotate)
    if len(lanes["lane_positions"]):
        # Outliers: non-focal actors far from every lane point (padded points count as zeros,
        # as in the published extractor).
        samples = lanes["lane_positions"].reshape(-1, 2)
        d2 = ((positions[:, CURRENT_STEP, None, :] - samples[None]) ** 2).sum(-1)
        keep = np.sqrt(d2.min(axis=1)) < OUTLIER_LANE_DIST_M
    else:
        keep = np.zeros(num, bool)
    keep[0] = True
    actor_ids = [t for t, k in zip(actor_ids, keep) if k]
    scene = {
        "positions": positions[keep],
        "x_angles": angles[keep],
        "x_velocity": speed[keep],
        "x_padding_mask": padding[keep],
        "x_attr": attr[keep],
        **lanes,
        "origin": origin.reshape(1, 2).astype(np.float32),
        "theta": np.float32(theta),
        "scenario_id": str(cols["scenario_id"]),
        "track_id": focal,
        "city": str(cols["city"]),
        "actor_ids": actor_ids,
    }
    return scene


def extract(path: str | Path, split: str = "val") -> dict:
    """Forecast-MAE features of one AV2 scenario (directory or parquet file).

    Returns the dict of FORECAST_MAE.md: ``x`` [A, 50, 2], ``y`` [A, 60, 2] (None for
    ``split="test"``), ``x_attr`` [A, 3], ``x_positions`` [A, 50, 2], ``x_centers`` [A, 2],
    ``x_angles`` [A, 110] (radians), ``x_velocity`` [A, 110] (m/s), ``x_velocity_diff`` [A, 50],
    ``x_padding_mask`` [A, 110], lane arrays [L, 20, ...], ``origin`` [1, 2], ``theta``,
    ``scenario_id``, ``track_id`` (focal) and ``city``. Positions in metres, local frame.
    """
    scene = read_local_scene(path, split)
    return features_from_scene(scene, with_future=split != "test")


def features_from_scene(scene: dict, with_future: bool = True) -> dict:
    derived = derive_actor_features(scene["positions"], scene["x_velocity"], scene["x_padding_mask"], with_future)
    out = {k: v for k, v in scene.items() if k not in ("positions", "actor_ids")}
    out.update(derived)
    return out
