"""Turn simulated traffic into one Argoverse 2 scenario: track categories, the AV, sensor range,
tracker noise, the parquet file and the map JSON, written atomically."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa

from forecast_peft.constants import CURRENT_STEP, HISTORY_STEPS, TOTAL_STEPS, UNSCORED_TRACK
from forecast_peft.data import av2_format
from forecast_peft.data.av2_format import MOVERS, map_points, polyline_tangents, scenario_table, track_categories
from forecast_peft.data.synth.roadnet import RoadNet
from forecast_peft.data.synth.sim import Tracks

CITIES = ("austin", "dearborn", "miami", "palo-alto", "pittsburgh", "washington-dc")
YIELD_WINDOW = 30  # steps from the present within which giving way makes a focal candidate interesting
MAP_RADIUS_M = 175.0  # lanes with a point this close (L-inf) to the focal are written


class NoFocalError(Exception):
    """The simulated traffic has no agent fit to be the focal track (the caller retries)."""


def choose_focal(tracks: Tracks, centre: np.ndarray, rng: np.random.Generator) -> int:
    """A lane-following mover seen all 110 steps near the centre; manoeuvres and left turners
    giving way around the present step are preferred (as AV2 mines interesting scenarios), and
    some focal agents are stopped."""
    full = tracks.active.all(axis=1) & tracks.on_lane
    near = np.linalg.norm(tracks.position[:, CURRENT_STEP] - centre, axis=1) < 45.0
    cand = np.flatnonzero(full & near)
    if len(cand) == 0:
        raise NoFocalError("no focal candidate")
    w = np.where(tracks.maneuver[cand], 30.0, 1.0) + np.where(tracks.speed[cand, CURRENT_STEP] < 0.3, 3.0, 0.0)
    yielding = (tracks.yield_to[cand, 0] >= 0) & (np.abs(tracks.yield_to[cand, 1] - CURRENT_STEP) <= YIELD_WINDOW)
    w = w + np.where(yielding, 10.0, 0.0)
    w = w * np.where(np.array([tracks.object_type[i] for i in cand]) == "vehicle", 1.0, 0.3)
    return int(cand[rng.choice(len(cand), p=w / w.sum())])


def _visibility(tracks: Tracks, av: int, focal: int, rng: np.random.Generator) -> np.ndarray:
    """Steps at which each agent is tracked: within sensor range of the AV, one contiguous run,
    with some tracks cut short as occlusions do."""
    sensor = rng.uniform(95.0, 140.0)
    dist = np.linalg.norm(tracks.position - tracks.position[av][None], axis=-1)
    seen = tracks.active & (dist <= sensor)
    n = len(seen)
    cut = rng.random(n)
    start = np.where(cut < 0.12, rng.integers(1, 90, n), 0)
    end = np.where((cut > 0.88), rng.integers(20, TOTAL_STEPS, n), TOTAL_STEPS)
    steps = np.arange(TOTAL_STEPS)[None]
    seen &= (steps >= start[:, None]) & (steps < end[:, None])
    # keep the longest contiguous run of each track
    out = np.zeros_like(seen)
    for i in np.flatnonzero(seen.any(axis=1)):
        edges = np.diff(np.concatenate([[0], seen[i].astype(np.int8), [0]]))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        k = np.argmax(ends - starts)
        out[i, starts[k] : ends[k]] = True
    out[focal] = True
    out[av] = True
    return out


def _noisy(tracks: Tracks, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tracker-like noise: slowly drifting position error, heading jitter, velocity from the
    noisy positions."""
    n = len(tracks.position)
    ped = np.array([t == "pedestrian" for t in tracks.object_type])
    sigma = np.where(ped, 0.08, 0.04)[:, None, None]
    white = rng.normal(size=(n, TOTAL_STEPS, 2)) * sigma
    drift = np.cumsum(white * 0.3, axis=1)
    drift -= drift.mean(axis=1, keepdims=True)
    pos = tracks.position + white * 0.5 + np.clip(drift, -0.3, 0.3)
    heading = tracks.heading + rng.normal(size=(n, TOTAL_STEPS)) * np.where(ped, 0.12, 0.015)[:, None]
    heading = (heading + np.pi) % (2 * np.pi) - np.pi
    vel = np.gradient(pos, 0.1, axis=1)
    # smooth velocity like a tracker's filter
    vel[:, 1:-1] = 0.25 * vel[:, :-2] + 0.5 * vel[:, 1:-1] + 0.25 * vel[:, 2:]
    vel[:, 0] = vel[:, 1]
    vel[:, -1] = vel[:, -2]
    moving = np.repeat(tracks.speed[..., None] > 0.05, 2, axis=-1)
    vel = np.where(moving, vel, rng.normal(size=vel.shape) * 0.02)
    static = np.array([not tracks.on_lane[i] and t != "pedestrian" for i, t in enumerate(tracks.object_type)])
    pos[static] = tracks.position[static] + rng.normal(size=(static.sum(), 1, 2)) * 0.05
    vel[static] = 0.0
    return pos, heading, vel


def build_scenario(
    net: RoadNet, tracks: Tracks, rng: np.random.Generator, split: str, city: str, scenario_id: str
) -> tuple[pa.Table, dict]:
    """The scenario parquet file's table and the map JSON dict."""
    centre = net.warp(np.zeros(2))
    focal = choose_focal(tracks, centre, rng)
    full = np.flatnonzero(tracks.active.all(axis=1) & tracks.on_lane & (np.arange(len(tracks.active)) != focal))
    d0 = np.linalg.norm(tracks.position[full, 0] - tracks.position[focal, 0], axis=1)
    close = full[(d0 < 80.0) & np.array([tracks.object_type[i] == "vehicle" for i in full])]
    av = int(rng.choice(close)) if len(close) else int(full[np.argmin(d0)]) if len(full) else focal
    if av == focal:
        raise NoFocalError("no vehicle for the AV")
    seen = _visibility(tracks, av, focal, rng)
    pos, heading, vel = _noisy(tracks, rng)
    keep = np.flatnonzero(seen.any(axis=1))
    dist_now = np.linalg.norm(tracks.position[:, CURRENT_STEP] - tracks.position[focal, CURRENT_STEP], axis=1)
    movers = np.array([t in MOVERS for t in tracks.object_type])
    category = track_categories(seen, movers, dist_now, tracks.speed[:, CURRENT_STEP], focal)
    category[av] = UNSCORED_TRACK

    base_id = int(rng.integers(10_000, 300_000))
    others = [i for i in rng.permutation(keep) if i != av]
    order = others + [av]
    ids = {i: ("AV" if i == av else str(base_id + k)) for k, i in enumerate(order)}
    last_step = HISTORY_STEPS if split == "test" else TOTAL_STEPS
    rows_agent, rows_step = [], []
    for i in order:
        steps = np.flatnonzero(seen[i, :last_step])
        rows_agent.append(np.full(len(steps), i))
        rows_step.append(steps)
    a = np.concatenate(rows_agent)
    t = np.concatenate(rows_step)
    start_ts = float(rng.integers(315_900_000, 316_000_000) * 1_000_000_000)
    map_id = int(rng.integers(0, 100_000))
    slice_id = str(uuid.UUID(bytes=rng.bytes(16), version=4))
    table = scenario_table(
        a,
        t,
        [ids.get(i, "") for i in range(len(seen))],
        list(tracks.object_type),
        category,
        pos,
        heading,
        vel,
        scenario_id=scenario_id,
        focal_id=ids[focal],
        city=city,
        start_ns=start_ts,
        num_steps=last_step,
        map_id=map_id,
        slice_id=slice_id,
    )
    return table, map_json(net, tracks.position[focal, CURRENT_STEP])


def map_json(net: RoadNet, centre: np.ndarray) -> dict:
    """The AV2 map archive of the lanes, crosswalks and drivable areas near ``centre``."""
    warp = net.warp
    designs = [lane.design for lane in net.lanes]
    count = np.array([len(d) for d in designs])
    last = np.cumsum(count) - 1
    first = last - count + 1
    design = np.concatenate(designs)
    tangent = polyline_tangents(design, first, last)
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], -1)
    half = np.repeat([lane.width / 2 for lane in net.lanes], count)[:, None]
    world = warp(design)
    left = warp(design + normal * half)
    right = warp(design - normal * half)
    near = np.flatnonzero(np.maximum.reduceat(np.abs(world - centre).max(axis=1) <= MAP_RADIUS_M, first))
    # one conversion of every point of the kept lanes, then slices per lane
    rows = np.concatenate([np.arange(first[i], last[i] + 1) for i in near])
    start = np.concatenate([[0], np.cumsum(count[near])])
    centre_pts = map_points(world[rows], np.zeros(len(rows)))
    left_pts = map_points(left[rows], warp.height(left[rows]))
    right_pts = map_points(right[rows], warp.height(right[rows]))
    lanes = {}
    for k, i in enumerate(near):
        lane = net.lanes[i]
        a, b = start[k], start[k + 1]
        lanes[str(lane.id)] = {
            "centerline": centre_pts[a:b],
            "id": lane.id,
            "is_intersection": lane.is_intersection,
            "lane_type": lane.lane_type,
            "left_lane_boundary": left_pts[a:b],
            "left_lane_mark_type": lane.left_mark,
            "left_neighbor_id": lane.left_neighbor,
            "predecessors": lane.predecessors,
            "right_lane_boundary": right_pts[a:b],
            "right_lane_mark_type": lane.right_mark,
            "right_neighbor_id": lane.right_neighbor,
            "successors": lane.successors,
        }
    next_id = 1_000_000 + len(net.lanes)
    walks = [cw for j in net.junctions for cw in j.crosswalks]
    crossings = {}
    if walks:
        edges = warp(np.stack(walks))  # [C, 2 edges, 2 points, 2]
        keep = np.abs(edges[:, 0] - centre).max(axis=(-1, -2)) <= MAP_RADIUS_M
        pts = map_points(edges.reshape(-1, 2), warp.height(edges.reshape(-1, 2)))
        for c in np.flatnonzero(keep):
            crossings[str(next_id)] = {
                "edge1": pts[4 * c : 4 * c + 2],
                "edge2": pts[4 * c + 2 : 4 * c + 4],
                "id": next_id,
            }
            next_id += 1
    areas = {}
    if net.drivable:
        corners = np.stack(net.drivable)  # [D, 4, 2]
        steps = np.arange(6)[:, None] / 6.0
        dense = (corners[:, :, None] * (1 - steps) + np.roll(corners, -1, axis=1)[:, :, None] * steps).reshape(
            len(corners), 24, 2
        )
        rings = warp(np.concatenate([dense, dense[:, :1]], axis=1))  # [D, 25, 2]
        keep = np.abs(rings - centre).max(axis=-1).min(axis=-1) <= MAP_RADIUS_M
        pts = map_points(rings.reshape(-1, 2), warp.height(rings.reshape(-1, 2)))
        for d in np.flatnonzero(keep):
            areas[str(next_id)] = {"area_boundary": pts[25 * d : 25 * d + 25], "id": next_id}
            next_id += 1
    return {"drivable_areas": areas, "lane_segments": lanes, "pedestrian_crossings": crossings}


def write_scenario(split_dir: Path, table: pa.Table, map_data: dict) -> Path:
    """Write one synthetic scenario (``av2_format.write_scenario``)."""
    hint = "free some space or write to a larger disk; the same command adds the rest to the scenarios written so far"
    return av2_format.write_scenario(split_dir, table, map_data, hint)
