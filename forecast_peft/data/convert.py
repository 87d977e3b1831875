"""`fpeft convert`: driving logs of one's own, a table of tracks and a lane map, cut into
Argoverse 2 scenarios, so that every stage reads them as it reads AV2.

Tracks: one row per track and time, in CSV or parquet files. Columns ``track_id``, ``time_s``
(seconds) or ``timestamp_ns``, ``x`` and ``y`` (metres, in the map's frame); optional ``log_id``
(else the file's name), ``object_type`` (AV2's names; ``vehicle`` where absent), ``heading``
(radians; else the direction of motion), ``vx`` and ``vy`` (m/s; else from the positions) and
``city``. Each track is resampled to 10 Hz by linear interpolation, across gaps of at most
``max_gap_s``; each log is cut into windows of 110 steps (50 for the test split) every
``stride_s``, and each window gives one scenario for each of its ``focal_per_window`` movers
seen at every step of it that score highest by ``focal_by``: travel farthest (the default), turn
most, change speed most, or come closest to another moving road user.

Map: a GeoJSON FeatureCollection of LineString lane centrelines (properties ``id``, ``width``,
``lane_type``, ``is_intersection``, ``successors``, ``predecessors``, all optional; a lane without
successors gets the lanes that start within ``JOIN_M`` of its end, and the same for
predecessors), or an AV2 map archive (``log_map_archive_*.json``). Each scenario gets the lanes
near its focal agent.
"""

from __future__ import annotations

import json
import math
import sys
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa

from forecast_peft.constants import (
    CURRENT_STEP,
    HISTORY_STEPS,
    HZ,
    LANE_TYPES,
    OBJECT_TYPES,
    OUTLIER_LANE_DIST_M,
    TOTAL_STEPS,
)
from forecast_peft.data import check_split
from forecast_peft.data.av2_format import (
    MOVERS,
    UNSCORED_MIN_STEPS,
    map_points,
    polyline_tangents,
    scenario_table,
    scenario_written,
    track_categories,
    write_scenario,
)
from forecast_peft.data.files import write_json_atomic
from forecast_peft.errors import ConfigError, UserError, count, first_of, reason_of
from forecast_peft.runtime import progress_bar

# a GeoJSON lane without successors (predecessors) gets those that start (end) this close to its end (start)
JOIN_M = 0.5
MAP_RADIUS_M = 175.0  # lanes, crossings and areas reaching this close (L-inf) to the focal agent are kept
STEP_S = 1.0 / HZ
TIME_EPS_S = 1e-6
# beyond this, float32 features (as the published extractor computes them) round positions to
# more than a centimetre
MAX_COORDINATE_M = 1e5
INTERACTION_CHUNK = 32  # candidates whose distances to every track at every step are measured at once
MIN_HEADING_SPEED = 0.5  # m/s: below it the direction of motion says nothing of the heading
NAMESPACE = uuid.UUID("6f1d4c52-93a5-4f0e-9a7c-2c7f0b3f5a11")  # scenario ids: uuid5 of log, window, focal
TIME_COLUMNS = ("time_s", "timestamp_ns")
TEXT_COLUMNS = ("log_id", "track_id", "object_type", "city")
NUMERIC = ("x", "y", "heading", "vx", "vy")
PARQUET_SUFFIXES = (".parquet", ".pq")  # other tracks files are read as CSV (pandas unpacks .csv.gz)
TRACKS_SUFFIXES = (".csv", ".csv.gz", *PARQUET_SUFFIXES)
# in the dataset root: the logs each split's scenarios were cut from, {split: [log, ...]}
LOGS_FILE = ".convert_logs.json"


@dataclass
class Track:
    """One track on the 10 Hz grid of its log, over the steps from its first sample to its last."""

    track_id: str
    object_type: str
    start: int  # grid step of the first entry
    seen: np.ndarray  # [L] bool: a sample there, or a gap short enough to bridge
    position: np.ndarray  # [L, 2] metres
    heading: np.ndarray  # [L] radians
    velocity: np.ndarray  # [L, 2] m/s


@dataclass
class Log:
    """One log's tracks (``log_id``, else its file's name) on a 10 Hz grid from its first sample."""

    name: str
    source: Path
    city: str
    start_ns: float  # the time of grid step 0
    steps: int
    tracks: list[Track]

    @cached_property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """The grid steps [start, end) of each track: [N] each."""
        starts = np.array([t.start for t in self.tracks])
        return starts, starts + np.array([len(t.seen) for t in self.tracks])


def _where(path: Path, index: int) -> str:
    """A row of a tracks file as its user finds it: a CSV file's line (after the header), else its row."""
    return f"row {index}" if path.suffix in PARQUET_SUFFIXES else f"line {index + 2}"


def _file_log(path: Path) -> str:
    """The log of a tracks file without a log_id column: its name without the suffix (drive.csv.gz: drive)."""
    return next(
        (path.name[: -len(s)] for s in TRACKS_SUFFIXES if path.name.endswith(s) and len(path.name) > len(s)), path.stem
    )


def read_tracks(path: Path) -> tuple[pd.DataFrame, list[str]]:
    """The rows of a tracks file with their columns checked; rows with a missing or non-numeric
    value are left out, and the returned lines say how many and where.

    Raises:
        UserError: naming the file and its problem (missing, unreadable, a required column
            absent, an unknown object type, a track with two rows at one time).
    """
    if not path.is_file():
        raise UserError(f"{path}: no such tracks file")
    parquet = path.suffix in PARQUET_SUFFIXES
    try:
        # ids as written: 007 stays 007, and a column with an empty cell does not turn 12 into 12.0
        frame = pd.read_parquet(path) if parquet else pd.read_csv(path, dtype=dict.fromkeys(TEXT_COLUMNS, str))
    except Exception as err:  # pandas/pyarrow raise many kinds for a broken file
        raise UserError(f"{path}: unreadable as {'parquet' if parquet else 'CSV'} ({reason_of(err)})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in ("track_id", "x", "y") if c not in frame.columns]
    if missing or not any(c in frame.columns for c in TIME_COLUMNS):
        what = missing + ([] if any(c in frame.columns for c in TIME_COLUMNS) else ["time_s (or timestamp_ns)"])
        raise UserError(
            f"{path}: no {', '.join(what)} column; a tracks file has track_id, time_s or timestamp_ns, x and y "
            f"(optional: log_id, object_type, heading, vx, vy, city); its columns: {', '.join(map(str, frame.columns))}"
        )
    time_col = "timestamp_ns" if "timestamp_ns" in frame.columns else "time_s"
    if ("vx" in frame.columns) != ("vy" in frame.columns):
        raise UserError(
            f"{path}: velocity needs both vx and vy columns, or neither (it is then taken from the positions)"
        )
    numeric = [c for c in (time_col, *NUMERIC) if c in frame.columns]
    for name in numeric:
        if name != "timestamp_ns":
            frame[name] = pd.to_numeric(frame[name], errors="coerce").astype(np.float64)
    if time_col == "timestamp_ns":
        # whole nanoseconds: a fraction of one (a float column) would not cast
        frame[time_col] = pd.to_numeric(frame[time_col], errors="coerce").round().astype("Int64")
    bad = frame[numeric].isna().any(axis=1) | frame["track_id"].isna()
    if "object_type" in frame.columns:
        bad |= frame["object_type"].isna() | (frame["object_type"].astype(str).str.strip() == "")
    bad |= ~np.isfinite(frame[[c for c in numeric if c != "timestamp_ns"]].to_numpy(np.float64)).all(axis=1)
    notes = []
    if bad.any():
        first = int(np.flatnonzero(bad.to_numpy())[0])
        notes.append(
            f"{path}: left out {count(int(bad.sum()), 'row')} with an empty or non-numeric {'/'.join(numeric)} "
            f"or an empty track_id{'/object_type' if 'object_type' in frame.columns else ''} "
            f"(the first: {_where(path, first)})"
        )
        frame = frame[~bad.to_numpy()].copy()
    if frame.empty:
        raise UserError(f"{path}: no rows to convert")
    frame["track_id"] = frame["track_id"].astype(str)
    frame["log_id"] = frame["log_id"].astype(str) if "log_id" in frame.columns else _file_log(path)
    if "object_type" in frame.columns:
        types = frame["object_type"].astype(str).str.strip().str.lower()
        unknown = sorted(set(types.unique()) - set(OBJECT_TYPES))
        if unknown:
            raise UserError(
                f"{path}: unknown object_type {first_of([repr(u) for u in unknown])}: AV2's types are "
                f"{', '.join(OBJECT_TYPES)}; rename them in the file (car -> vehicle, ...)"
            )
        frame["object_type"] = types
    else:
        frame["object_type"] = "vehicle"
    twice = frame.duplicated(["log_id", "track_id", time_col])
    if twice.any():
        row = frame[twice.to_numpy()].iloc[0]
        raise UserError(
            f"{path}: track {row['track_id']} of log {row['log_id']} has two rows at {time_col} {row[time_col]}"
        )
    return frame, notes


def tracks_files(paths: list[str | Path]) -> list[Path]:
    """The tracks files given: files as they are, and a folder's CSV and parquet files, in name order."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(f for f in path.iterdir() if f.is_file() and f.name.endswith(TRACKS_SUFFIXES))
            if not found:
                raise UserError(f"{path}: a folder without tracks files ({', '.join(TRACKS_SUFFIXES)})")
            files += found
        else:
            files.append(path)
    return files


def _runs(seen: np.ndarray) -> list[tuple[int, int]]:
    """The [start, end) index ranges of the True runs of ``seen``."""
    edges = np.diff(np.concatenate([[0], seen.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def resample(times: np.ndarray, values: dict[str, np.ndarray], max_gap_s: float) -> tuple[int, np.ndarray, dict]:
    """One track's samples on the 10 Hz grid of its log (steps of ``STEP_S`` from time 0).

    Args:
        times: [S] seconds from the log's start, increasing; values: name -> [S] or [S, 2].
    Returns:
        the first grid step, ``seen`` [L] (a sample at the step, or between two samples at most
        ``max_gap_s`` apart) and each value interpolated linearly at the L steps.
    """
    first = math.ceil(times[0] * HZ - TIME_EPS_S * HZ)
    last = math.floor(times[-1] * HZ + TIME_EPS_S * HZ)
    grid = np.arange(first, last + 1) / HZ
    before = np.clip(np.searchsorted(times, grid + TIME_EPS_S, side="right") - 1, 0, len(times) - 1)
    exact = np.abs(times[before] - grid) <= TIME_EPS_S
    after = np.minimum(before + 1, len(times) - 1)
    bridged = (after > before) & (times[after] - times[before] <= max_gap_s + TIME_EPS_S)
    out = {}
    for name, v in values.items():
        cols = v if v.ndim == 2 else v[:, None]
        out[name] = np.stack([np.interp(grid, times, cols[:, k]) for k in range(cols.shape[1])], -1).reshape(
            (len(grid),) + v.shape[1:]
        )
    return first, exact | bridged, out


def _velocity_from_positions(position: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """[L, 2] m/s: the positions' central differences within each run of seen steps (0 for a
    run of one step)."""
    velocity = np.zeros_like(position)
    for a, b in _runs(seen):
        if b - a > 1:
            velocity[a:b] = np.gradient(position[a:b], STEP_S, axis=0)
    return velocity


def _heading_from_velocity(velocity: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """[L] radians: the direction of motion where the track moves at least ``MIN_HEADING_SPEED``,
    elsewhere that of the nearest step before (else after) where it does; 0 for a track that never does."""
    moving = seen & (np.linalg.norm(velocity, axis=-1) >= MIN_HEADING_SPEED)
    if not moving.any():
        return np.zeros(len(velocity))
    direction = pd.Series(np.where(moving, np.arctan2(velocity[:, 1], velocity[:, 0]), np.nan))
    return direction.ffill().bfill().to_numpy()


def build_logs(frame: pd.DataFrame, path: Path, max_gap_s: float, city: str, origin: np.ndarray) -> list[Log]:
    """The logs of one tracks file, each track on the log's 10 Hz grid."""
    logs = []
    has_velocity, has_heading = "vx" in frame.columns, "heading" in frame.columns
    for name, rows in frame.groupby("log_id", sort=False):
        if "timestamp_ns" in rows.columns:
            ns = rows["timestamp_ns"].to_numpy(np.int64)
            start_ns = int(ns.min())
            times = (ns - start_ns) / 1e9
        else:
            seconds = rows["time_s"].to_numpy(np.float64)
            start_ns = float(seconds.min()) * 1e9
            times = seconds - seconds.min()
        columns = {"position": rows[["x", "y"]].to_numpy(np.float64) - origin}
        if has_velocity:
            columns["velocity"] = rows[["vx", "vy"]].to_numpy(np.float64)
        if has_heading:
            columns["heading"] = rows["heading"].to_numpy(np.float64)
        types = rows["object_type"].to_numpy()
        codes, track_ids = pd.factorize(rows["track_id"])  # tracks in the order they first appear
        order = np.lexsort((times, codes))  # each track's rows together, in time order
        tracks = []
        for k, own in enumerate(np.split(order, np.flatnonzero(np.diff(codes[order])) + 1)):
            values = {name: v[own] for name, v in columns.items()}
            if has_heading:
                values["heading"] = np.unwrap(values["heading"])
            start, seen, grid = resample(times[own], values, max_gap_s)
            velocity = grid["velocity"] if has_velocity else _velocity_from_positions(grid["position"], seen)
            if has_heading:
                heading = (grid["heading"] + np.pi) % (2 * np.pi) - np.pi
            else:
                heading = _heading_from_velocity(velocity, seen)
            tracks.append(
                Track(str(track_ids[k]), str(types[own[0]]), start, seen, grid["position"], heading, velocity)
            )
        steps = max(tr.start + len(tr.seen) for tr in tracks)
        log_city = str(rows["city"].iloc[0]) if "city" in rows.columns else city
        logs.append(Log(str(name), path, log_city, float(start_ns), steps, tracks))
    return logs


@dataclass
class LaneMap:
    """A map's lanes (and an AV2 archive's crosswalks and drivable areas) as AV2 dicts, with the
    bounding box of each for cropping."""

    source: Path
    lanes: list[dict]
    lane_boxes: np.ndarray  # [L, 4] min x, min y, max x, max y
    segment_start: np.ndarray  # [S, 2] the lanes' centreline segments, lane by lane
    segment_end: np.ndarray  # [S, 2]
    segment_offsets: np.ndarray  # [L + 1] lane i's segments are segment_offsets[i]:segment_offsets[i + 1]
    crossings: list[dict]
    crossing_boxes: np.ndarray
    areas: list[dict]
    area_boxes: np.ndarray

    def around(self, xy: np.ndarray, radius: float = MAP_RADIUS_M) -> dict:
        """The AV2 map archive of what reaches within ``radius`` (L-inf) of ``xy``."""
        return {
            "drivable_areas": {str(self.areas[i]["id"]): self.areas[i] for i in _within(self.area_boxes, xy, radius)},
            "lane_segments": {str(self.lanes[i]["id"]): self.lanes[i] for i in _within(self.lane_boxes, xy, radius)},
            "pedestrian_crossings": {
                str(self.crossings[i]["id"]): self.crossings[i] for i in _within(self.crossing_boxes, xy, radius)
            },
        }

    def distance_to_lanes(self, xy: np.ndarray, within: float) -> float:
        """Metres from ``xy`` to the nearest lane centreline, where one lies ``within`` metres (inf
        otherwise): only the lanes whose box reaches that close are measured, not the whole map."""
        near = _within(self.lane_boxes, xy, within)
        if len(near) == 0:
            return math.inf
        rows = np.concatenate([np.arange(self.segment_offsets[i], self.segment_offsets[i + 1]) for i in near])
        return distance_to_segments(xy, self.segment_start[rows], self.segment_end[rows])


def _within(boxes: np.ndarray, xy: np.ndarray, radius: float) -> np.ndarray:
    """Indices of the boxes [B, 4] (min x, min y, max x, max y) that reach within ``radius`` (L-inf) of ``xy``."""
    return np.flatnonzero(
        (boxes[:, 0] <= xy[0] + radius)
        & (boxes[:, 2] >= xy[0] - radius)
        & (boxes[:, 1] <= xy[1] + radius)
        & (boxes[:, 3] >= xy[1] - radius)
    )


def _xy(points: list[dict]) -> np.ndarray:
    return np.array([(p["x"], p["y"]) for p in points], dtype=np.float64).reshape(-1, 2)


def _boxes(point_sets: list[np.ndarray]) -> np.ndarray:
    return np.array([[*p.min(axis=0), *p.max(axis=0)] for p in point_sets]).reshape(-1, 4)


def _shifted(points: list[dict], origin: np.ndarray) -> list[dict]:
    """Map points less ``origin``, as plain floats (the JSON writer takes no numpy scalars)."""
    x0, y0 = (float(v) for v in origin)
    return [{"x": p["x"] - x0, "y": p["y"] - y0, "z": p["z"]} for p in points]


def _archive_map(path: Path, data: dict, origin: np.ndarray) -> LaneMap:
    """An AV2 map archive as it is (shifted by ``origin``)."""
    try:
        lanes = list(data["lane_segments"].values())
        crossings = list((data.get("pedestrian_crossings") or {}).values())
        areas = list((data.get("drivable_areas") or {}).values())
        if origin.any():
            for lane in lanes:
                for key in ("centerline", "left_lane_boundary", "right_lane_boundary"):
                    if key in lane:
                        lane[key] = _shifted(lane[key], origin)
            for c in crossings:
                c["edge1"], c["edge2"] = _shifted(c["edge1"], origin), _shifted(c["edge2"], origin)
            for a in areas:
                a["area_boundary"] = _shifted(a["area_boundary"], origin)
        lane_points = [_xy(lane["left_lane_boundary"] + lane["right_lane_boundary"]) for lane in lanes]
        # the centreline, or (an archive's lanes may lack it) the boundaries, for the distance check
        centres = [_xy(lane["centerline"]) if lane.get("centerline") else p for lane, p in zip(lanes, lane_points)]
        # a centreline of one point: one segment of length 0
        ends = [(c[:-1], c[1:]) if len(c) > 1 else (c, c) for c in centres]
        boxes = [_boxes(lane_points), _boxes([_xy(c["edge1"] + c["edge2"]) for c in crossings])]
        boxes.append(_boxes([_xy(a["area_boundary"]) for a in areas]))
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise UserError(f"{path}: not a readable AV2 map archive ({type(err).__name__}: {err})") from None
    return LaneMap(
        path,
        lanes,
        boxes[0],
        np.concatenate([a for a, _ in ends]) if ends else np.zeros((0, 2)),
        np.concatenate([b for _, b in ends]) if ends else np.zeros((0, 2)),
        np.concatenate([[0], np.cumsum([len(a) for a, _ in ends], dtype=np.int64)]),
        crossings,
        boxes[1],
        areas,
        boxes[2],
    )


def _lane_property(path: Path, index: int, props: dict, key: str, default, cast):
    value = props.get(key)
    try:
        return cast(default if value is None else value)
    except (TypeError, ValueError):
        raise UserError(f"{path}: feature {index}: {key} {props.get(key)!r} is not {cast.__doc__}") from None


def _lane_id(value) -> int:
    """an integer (AV2's lane ids are)"""
    if isinstance(value, bool) or float(value) != int(float(value)):
        raise ValueError
    return int(float(value))


def _lane_ids(value) -> list[int]:
    """a list of lane ids"""
    if not isinstance(value, list):
        raise TypeError
    return [_lane_id(v) for v in value]


def _width(value) -> float:
    """a width in metres above 0"""
    width = float(value)
    if not width > 0:
        raise ValueError
    return width


def _lane_type(value) -> str:
    """one of VEHICLE, BIKE, BUS"""
    name = str(value).upper()
    if name not in LANE_TYPES:
        raise ValueError
    return name


def _flag(value) -> bool:
    """true or false"""
    if not isinstance(value, bool):
        raise TypeError
    return value


def joins(ends: np.ndarray, starts: np.ndarray, within: float = JOIN_M) -> dict[int, list[int]]:
    """For each polyline, the others that start within ``within`` metres of where it ends.

    Args:
        ends, starts: [L, 2] the last and the first point of each polyline.
    Returns:
        {i: [j, ...]} for the polylines i with any, j in increasing order; a cell grid of side
        ``within``, so each end is compared with the starts of its 3 x 3 cells only.
    """
    cells: dict[tuple[int, int], list[int]] = {}
    for j, (cx, cy) in enumerate(np.floor(starts / within).astype(np.int64).tolist()):
        cells.setdefault((cx, cy), []).append(j)
    out = {}
    for i, (cx, cy) in enumerate(np.floor(ends / within).astype(np.int64).tolist()):
        near = [j for dx in (-1, 0, 1) for dy in (-1, 0, 1) for j in cells.get((cx + dx, cy + dy), ()) if j != i]
        found = sorted(j for j in near if np.hypot(*(starts[j] - ends[i])) <= within)
        if found:
            out[i] = found
    return out


def _geojson_map(path: Path, data: dict, lane_width_m: float, origin: np.ndarray) -> LaneMap:
    """GeoJSON lane centrelines as AV2 lane segments: boundaries half the lane's width to each
    side, ground height 0 unless the coordinates give one."""
    features = data.get("features")
    if not isinstance(features, list):
        raise UserError(f"{path}: a GeoJSON FeatureCollection without a features list")
    lines, props = [], []
    for i, feature in enumerate(features):
        feature = feature if isinstance(feature, dict) else {}
        geometry = feature.get("geometry") or {}
        if geometry.get("type") != "LineString":
            raise UserError(
                f"{path}: feature {i} is a {geometry.get('type', 'feature without geometry')}: "
                "every feature of a lane map is a LineString lane centreline"
            )
        try:
            coords = np.asarray(geometry.get("coordinates"), dtype=np.float64)
        except (TypeError, ValueError):
            coords = np.zeros((0, 0))
        if coords.ndim != 2 or coords.shape[1] not in (2, 3) or len(coords) < 2 or not np.isfinite(coords).all():
            raise UserError(f"{path}: feature {i}: a lane centreline needs 2 or more [x, y] or [x, y, z] points")
        lines.append(
            np.concatenate(
                [coords[:, :2] - origin, coords[:, 2:3] if coords.shape[1] == 3 else np.zeros((len(coords), 1))], 1
            )
        )
        own = feature.get("properties") if isinstance(feature.get("properties"), dict) else {}
        props.append({"id": feature["id"], **own} if "id" in feature else own)  # a property id wins
    ids = [_lane_property(path, i, p, "id", i + 1, _lane_id) for i, p in enumerate(props)]
    dup = pd.Index(ids).duplicated()
    if dup.any():
        raise UserError(f"{path}: two lanes have the id {ids[int(np.flatnonzero(dup)[0])]}")
    if not lines:
        return _archive_map(path, {"lane_segments": {}}, origin)  # read_map refuses it
    points = np.concatenate(lines)
    if np.ptp(points[:, :2], axis=0).max() < 1.0:
        # no map of metres is this small; GeoJSON's own coordinates are degrees of longitude and latitude
        raise UserError(
            f"{path}: every lane lies within 1 unit of the others, as longitude/latitude degrees (GeoJSON's "
            "default) would: give the lanes in metres, in the tracks' frame (a projected one such as UTM, "
            "with convert.origin)"
        )
    count_pts = np.array([len(line) for line in lines])
    last = np.cumsum(count_pts) - 1
    first = last - count_pts + 1
    tangent = polyline_tangents(points[:, :2], first, last)
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], -1)
    widths = [_lane_property(path, i, p, "width", lane_width_m, _width) for i, p in enumerate(props)]
    joined = joins(points[last, :2], points[first, :2])  # lane -> lanes that start where it ends
    after = {ids[i]: [ids[j] for j in js] for i, js in joined.items()}
    before: dict[int, list[int]] = {}
    for i, js in sorted(joined.items()):
        for j in js:
            before.setdefault(ids[j], []).append(ids[i])
    half = np.repeat(np.array(widths) / 2, count_pts)[:, None]
    lanes = {}
    for i, p in enumerate(props):
        a, b = first[i], last[i] + 1
        xy, z = points[a:b, :2], points[a:b, 2]
        lanes[str(ids[i])] = {
            "centerline": map_points(xy, z),
            "id": ids[i],
            "is_intersection": _lane_property(path, i, p, "is_intersection", False, _flag),
            "lane_type": _lane_property(path, i, p, "lane_type", "VEHICLE", _lane_type),
            "left_lane_boundary": map_points(xy + normal[a:b] * half[a:b], z),
            "left_lane_mark_type": "UNKNOWN",
            "left_neighbor_id": None,
            "predecessors": _lane_property(path, i, p, "predecessors", before.get(ids[i], []), _lane_ids),
            "right_lane_boundary": map_points(xy - normal[a:b] * half[a:b], z),
            "right_lane_mark_type": "UNKNOWN",
            "right_neighbor_id": None,
            "successors": _lane_property(path, i, p, "successors", after.get(ids[i], []), _lane_ids),
        }
    return _archive_map(path, {"lane_segments": lanes}, np.zeros(2))


def read_map(path: Path, lane_width_m: float, origin: np.ndarray) -> LaneMap:
    """A GeoJSON lane map or an AV2 map archive.

    Raises:
        UserError: naming the file and its problem.
    """
    if not path.is_file():
        raise UserError(f"{path}: no such map file" if not path.exists() else f"{path}: a folder, not a map file")
    try:
        data = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as err:
        raise UserError(f"{path}: not JSON ({err})") from None
    if isinstance(data, dict) and "lane_segments" in data:
        lane_map = _archive_map(path, data, origin)
    elif isinstance(data, dict) and data.get("type") == "FeatureCollection":
        lane_map = _geojson_map(path, data, lane_width_m, origin)
    else:
        raise UserError(
            f"{path}: neither a GeoJSON FeatureCollection of lane centrelines nor an AV2 map archive (lane_segments)"
        )
    if not lane_map.lanes:
        raise UserError(f"{path}: the map has no lanes, and the network reads the lanes around each scene")
    return lane_map


def distance_to_segments(xy: np.ndarray, start: np.ndarray, end: np.ndarray) -> float:
    """Metres from ``xy`` [2] to the nearest of the segments ``start`` -> ``end`` [S, 2] (inf for none)."""
    if len(start) == 0:
        return math.inf
    d = end - start
    t = np.clip(((xy - start) * d).sum(-1) / np.maximum((d * d).sum(-1), 1e-12), 0.0, 1.0)
    return float(np.sqrt((((start + t[:, None] * d) - xy) ** 2).sum(-1).min()))


@dataclass
class Window:
    """The tracks of a log that reach into one window of it, on its W steps."""

    log: Log
    first: int  # the log's grid step where the window starts
    track_ids: list[str]  # [n]
    object_types: list[str]  # [n]
    seen: np.ndarray  # [n, W] bool
    position: np.ndarray  # [n, W, 2] metres
    heading: np.ndarray  # [n, W] radians
    velocity: np.ndarray  # [n, W, 2] m/s
    movers: np.ndarray  # [n] bool: of MOVERS' types


def cut_window(log: Log, first: int, length: int) -> Window:
    """Steps [first, first + length) of the tracks of ``log`` that reach into them."""
    starts, ends = log.bounds
    idx = np.flatnonzero((starts < first + length) & (ends > first))
    n = len(idx)
    seen = np.zeros((n, length), bool)
    position = np.zeros((n, length, 2))
    heading = np.zeros((n, length))
    velocity = np.zeros((n, length, 2))
    for k, i in enumerate(idx):
        tr = log.tracks[i]
        a, b = max(tr.start, first), min(tr.start + len(tr.seen), first + length)
        src, dst = slice(a - tr.start, b - tr.start), slice(a - first, b - first)
        seen[k, dst] = tr.seen[src]
        position[k, dst] = tr.position[src]
        heading[k, dst] = tr.heading[src]
        velocity[k, dst] = tr.velocity[src]
    tracks = [log.tracks[i] for i in idx]
    types = [t.object_type for t in tracks]
    movers = np.array([t in MOVERS for t in types], dtype=bool)
    return Window(log, first, [t.track_id for t in tracks], types, seen, position, heading, velocity, movers)


def _speed(velocity: np.ndarray) -> np.ndarray:
    return np.linalg.norm(velocity, axis=-1)


def _travel(window: Window, idx: np.ndarray) -> np.ndarray:
    """Path length over the window, metres: [len(idx)]."""
    return np.linalg.norm(np.diff(window.position[idx], axis=1), axis=-1).sum(-1)


def _turn(window: Window, idx: np.ndarray) -> np.ndarray:
    """How far the heading swings over the steps an agent moves at (speed at least
    ``MIN_HEADING_SPEED``), radians: the range of the unwrapped heading there. A parked car's
    heading, whatever noise it has, does not count; a lane change swings far less than a turn."""
    moving = _speed(window.velocity[idx]) >= MIN_HEADING_SPEED  # [c, W]
    # the heading of the last step moved at, at each step: unwrapped, the moving steps' headings
    # are those of the moving steps alone unwrapped (plus, at most, one multiple of 2 pi for all)
    last = np.maximum.accumulate(np.where(moving, np.arange(moving.shape[1]), 0), axis=1)
    heading = np.unwrap(np.take_along_axis(window.heading[idx], last, axis=1), axis=1)
    swing = np.where(moving, heading, -np.inf).max(axis=1) - np.where(moving, heading, np.inf).min(axis=1)
    return np.where(moving.sum(axis=1) >= 2, swing, 0.0)


def _speed_change(window: Window, idx: np.ndarray) -> np.ndarray:
    """The fastest less the slowest speed over the window, m/s: a stop, a start, hard braking."""
    speed = _speed(window.velocity[idx])
    return speed.max(-1) - speed.min(-1)


def _interaction(window: Window, idx: np.ndarray) -> np.ndarray:
    """Minus the closest approach, metres, to another mover at a step where both move (speed at
    least ``MIN_HEADING_SPEED``): passing, merging, following closely; -inf where never both move
    (queueing at a light or passing parked cars is no interaction). The other one must be seen for
    6 s of the window at least (all of a test window's 5 s), as a track AV2 would not call a
    fragment: a detection seen for a moment beside a car is more often the tracker's noise."""
    steps = window.seen.shape[1]
    tracked = window.seen.sum(axis=1) >= min(UNSCORED_MIN_STEPS, steps)
    moving = window.seen & window.movers[:, None] & (_speed(window.velocity) >= MIN_HEADING_SPEED)
    partners = moving & tracked[:, None]  # [n, W]
    x, y = window.position[..., 0], window.position[..., 1]
    score = np.empty(len(idx))
    for a in range(0, len(idx), INTERACTION_CHUNK):  # [chunk, n, W] at a time
        block = idx[a : a + INTERACTION_CHUNK]
        both = moving[block][:, None] & partners[None]
        both[np.arange(len(block)), block] = False  # not itself
        gap2 = (x[block][:, None] - x[None]) ** 2 + (y[block][:, None] - y[None]) ** 2
        score[a : a + len(block)] = -np.sqrt(np.where(both, gap2, np.inf).min(axis=(1, 2)))
    return score


# convert.focal_by: what makes a window's agent its focal one, the highest score first
FOCAL_SCORES = {"travel": _travel, "turn": _turn, "speed_change": _speed_change, "interaction": _interaction}


def check_focal_by(focal_by: str) -> None:
    if focal_by not in FOCAL_SCORES:
        raise ConfigError(f"convert.focal_by must be one of {', '.join(FOCAL_SCORES)}, got {focal_by!r}")


def focal_agents(window: Window, most: int, types: frozenset[str] = MOVERS, by: str = "travel") -> np.ndarray:
    """The ``most`` agents of ``types`` (movers) seen at every step of the window with the highest
    ``FOCAL_SCORES[by]``, the highest first; ties go to the one that travels farthest."""
    of_type = np.array([t in types for t in window.object_types], dtype=bool)
    candidates = np.flatnonzero(window.seen.all(axis=1) & of_type)
    travelled = _travel(window, candidates)
    score = travelled if by == "travel" else FOCAL_SCORES[by](window, candidates)
    return candidates[np.lexsort((-travelled, -score))[:most]]


def scenario_of(window: Window, focal: int, scenario: str) -> pa.Table:
    """The scenario table of ``window`` with agent ``focal`` as its focal track."""
    seen, position, velocity = window.seen, window.position, window.velocity
    now = seen[:, CURRENT_STEP]
    dist_now = np.where(now, np.linalg.norm(position[:, CURRENT_STEP] - position[focal, CURRENT_STEP], axis=-1), np.inf)
    speed_now = np.where(now, np.linalg.norm(velocity[:, CURRENT_STEP], axis=-1), 0.0)
    category = track_categories(seen, window.movers, dist_now, speed_now, int(focal))
    agent, step = np.nonzero(seen)
    return scenario_table(
        agent,
        step,
        window.track_ids,
        window.object_types,
        category,
        position,
        window.heading,
        velocity,
        scenario_id=scenario,
        focal_id=window.track_ids[focal],
        city=window.log.city,
        start_ns=window.log.start_ns + window.first * STEP_S * 1e9,
        num_steps=seen.shape[1],
        map_id=0,
        slice_id=window.log.name,
    )


def scenario_id(log: str, first: int, track_id: str) -> str:
    """Known before writing, so that a re-run skips the scenarios already written."""
    return str(uuid.uuid5(NAMESPACE, f"{log}\n{first}\n{track_id}"))


def _check_coordinates(frames: list[tuple[Path, pd.DataFrame]], origin: np.ndarray) -> None:
    """Refuse coordinates so large that float32 features round them (UTM's, for one)."""
    for path, frame in frames:
        xy = frame[["x", "y"]].to_numpy(np.float64)
        far = np.abs(xy - origin).max()
        if far > MAX_COORDINATE_M:
            centre = np.round(np.median(xy, axis=0), -3)
            raise UserError(
                f"{path}: positions reach {far:,.0f} m from {'the origin' if not origin.any() else 'convert.origin'}: "
                f"the features are computed in float32, as the published extractor does, which rounds them to "
                f"{np.spacing(np.float32(far)):.2g} m; give convert.origin=[{centre[0]:.0f},{centre[1]:.0f}] (a point "
                "near the data, taken from the tracks and the map alike)"
            )


Spans = dict[str, list[list[int]]]  # log -> [[first step, last step], ...] its scenarios cover


def _logs_by_split(root: Path) -> dict[str, Spans]:
    """What earlier conversions into ``root`` recorded (nothing for a file that is missing or damaged)."""
    try:
        found = json.loads((root / LOGS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(found, dict):
        return {}
    return {split: logs for split, logs in found.items() if isinstance(logs, dict)}


def _say_shared_logs(root: Path, split: str, spans: Spans) -> None:
    """One line for each other split that holds scenarios of the same stretch of one of these
    logs: they overlap in time and scene, and scores on one split would measure memory of the other."""
    for other, logs in sorted(_logs_by_split(root).items()):
        shared = sorted(
            name for name, [(a, b)] in spans.items() if any(lo <= b and a <= hi for lo, hi in logs.get(name, []))
        )
        if other != split and shared:
            print(
                f"convert {split}: {count(len(shared), 'log')} of this split {'is' if len(shared) == 1 else 'are'} "
                f"in the {other} split too, over the same time ({first_of(shared)}): their scenarios overlap in "
                "time and scene, and scores on one split then measure memory of the other (convert.time_range_s "
                "takes a part of each log)",
                file=sys.stderr,
            )


def _record_logs(root: Path, split: str, spans: Spans) -> None:
    found = _logs_by_split(root)
    mine = found.setdefault(split, {})
    for name, span in spans.items():
        mine[name] = sorted({tuple(s) for s in mine.get(name, []) + span})
    write_json_atomic(root / LOGS_FILE, found)


def convert(
    tracks: list[str | Path],
    map_path: str | Path,
    out: str | Path,
    split: str = "train",
    city: str = "unknown",
    stride_s: float = 11.0,
    focal_per_window: int = 1,
    focal_types: list[str] | None = None,
    focal_by: str = "travel",
    time_range_s: list[float] | None = None,
    max_gap_s: float = 0.5,
    lane_width_m: float = 3.5,
    origin: list[float] | None = None,
    workers: int = 2,
    progress: bool = True,
) -> dict:
    """Cut the logs of ``tracks`` (the part ``time_range_s`` of each, seconds from its first sample;
    all for None) into AV2 scenarios in ``out/split``, with the lanes of ``map_path`` near each
    focal agent (of ``focal_types``, all movers for none; the ``focal_per_window`` of each window
    with the highest ``FOCAL_SCORES[focal_by]``), ``workers`` threads writing the files;
    returns the counts it prints."""
    check_split(split)
    if not tracks:
        raise UserError("no tracks to convert: give one or more files with --tracks FILE")
    if map_path is None:
        raise UserError("no map: give the lanes with --map FILE (GeoJSON lane centrelines or an AV2 map archive)")
    if out is None:
        raise UserError(
            "no output folder: give the dataset root, as in fpeft convert DIR --tracks ... "
            "(scenarios go to DIR/<split>/)"
        )
    shift = np.zeros(2) if origin is None else np.asarray(list(origin), dtype=np.float64)
    if workers < 1:
        raise UserError(f"convert.workers must be >= 1, got {workers}")
    if time_range_s is not None and (len(time_range_s) != 2 or not 0 <= time_range_s[0] < time_range_s[1]):
        raise UserError(f"convert.time_range_s must be [start, end] in seconds, 0 <= start < end, got {time_range_s}")
    focal_kinds = frozenset(focal_types) if focal_types else MOVERS
    if not focal_kinds <= MOVERS:
        wrong = sorted(focal_kinds - MOVERS)
        raise UserError(
            f"convert.focal_types: {first_of([repr(t) for t in wrong])} cannot be a focal agent; the types that can: "
            f"{', '.join(t for t in OBJECT_TYPES if t in MOVERS)}"
        )
    check_focal_by(focal_by)
    if shift.shape != (2,):
        raise UserError(f"convert.origin must be two numbers [x, y], got {origin}")
    lane_map = read_map(Path(map_path), lane_width_m, shift)
    frames = []
    for path in tracks_files(tracks):
        frame, notes = read_tracks(path)
        for line in notes:
            print(line, file=sys.stderr)
        frames.append((path, frame))
    _check_coordinates(frames, shift)
    logs: list[Log] = []
    for path, frame in frames:
        logs += build_logs(frame, path, max_gap_s, city, shift)
    names = pd.Index([log.name for log in logs])
    if names.duplicated().any():
        name = names[names.duplicated()][0]
        sources = sorted({str(log.source) for log in logs if log.name == name})
        raise UserError(
            f"two logs are named {name} ({' and '.join(sources)}): give each file a log_id column, "
            "or files of other names"
        )
    length = HISTORY_STEPS if split == "test" else TOTAL_STEPS
    stride = max(1, round(stride_s * HZ))
    low, high = (0, math.inf) if time_range_s is None else (round(t * HZ) for t in time_range_s)
    starts = {log.name: range(low, min(log.steps, high + 1) - length + 1, stride) for log in logs}
    windows = [(log, s) for log in logs for s in starts[log.name]]
    if not windows:
        longest = max(log.steps for log in logs) / HZ
        what = (
            f"is {length / HZ:g} s long"
            if time_range_s is None
            else f"has {length / HZ:g} s within convert.time_range_s={list(time_range_s)}"
        )
        raise UserError(
            f"no log {what}, which a {split} scenario needs ({length} steps at {HZ} Hz); the longest: {longest:g} s"
        )
    # the steps this call's windows cover, per log
    covered: Spans = {name: [[s[0], s[-1] + length - 1]] for name, s in starts.items() if len(s)}
    split_dir = Path(out) / split
    split_dir.mkdir(parents=True, exist_ok=True)
    _say_shared_logs(Path(out), split, covered)
    hint = "free some space or write to a larger disk; the same command adds the rest to the scenarios written so far"
    counts = {"logs": len(logs), "windows": len(windows), "written": 0, "present": 0, "no_focal": 0, "off_lane": 0}
    begin = time.perf_counter()
    pending: deque[Future] = deque()
    bar = progress_bar(windows, desc=f"convert {split}", unit="window", disable=not progress)
    # pyarrow writes parquet without Python's lock: threads write while this one cuts the next windows
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for log, first in bar:
            window = cut_window(log, first, length)
            chosen = focal_agents(window, focal_per_window, focal_kinds, focal_by)
            counts["no_focal"] += len(chosen) == 0
            for focal in chosen:
                sid = scenario_id(log.name, first, window.track_ids[focal])
                if scenario_written(split_dir / sid):
                    counts["present"] += 1
                    continue
                now = window.position[focal, CURRENT_STEP]
                pending.append(
                    pool.submit(write_scenario, split_dir, scenario_of(window, focal, sid), lane_map.around(now), hint)
                )
                counts["written"] += 1
                counts["off_lane"] += lane_map.distance_to_lanes(now, OUTLIER_LANE_DIST_M) > OUTLIER_LANE_DIST_M
                while len(pending) > 2 * workers:  # a bounded queue: the tables wait in memory
                    pending.popleft().result()
        for done in pending:
            done.result()
    secs = time.perf_counter() - begin
    _record_logs(Path(out), split, covered)
    if progress:
        print(
            f"convert {split}: {count(len(logs), 'log')}, {count(len(windows), 'window')} of {length / HZ:g} s: "
            f"wrote {count(counts['written'], 'scenario')}, {counts['present']} already present, to {split_dir} "
            f"in {secs:.1f} s"
        )
        if counts["no_focal"]:
            print(
                f"convert {split}: {count(counts['no_focal'], 'window')} without a "
                f"{'mover' if focal_kinds == MOVERS else ' or '.join(sorted(focal_kinds))} seen at every one of "
                f"{length} steps gave no scenario",
                file=sys.stderr,
            )
        if counts["off_lane"]:
            print(
                f"convert {split}: in {counts['off_lane']} of the {count(counts['written'], 'scenario')} written the "
                f"focal agent is more than {OUTLIER_LANE_DIST_M:g} m from every lane centreline at the present step: "
                "if they are vehicles, check that the map and the tracks share a frame",
                file=sys.stderr,
            )
    return counts
