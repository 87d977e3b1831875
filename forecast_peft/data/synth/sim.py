"""Traffic on a synthetic road network: lane following with IDM car following, route choice at
junctions, signals and all-way stops, lane changes, cyclists, pedestrians, parked and static
objects. Vectorised over agents; one call simulates the whole 11 s (plus a warm-up)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from forecast_peft.data.synth.roadnet import RoadNet
from forecast_peft.data.synth.styles import Style

DT = 0.1
LANE_SPACING_M = 1.0
LANE_CHANGE_S = 3.5


@dataclass
class LaneGeometry:
    """All lane centrelines of the design plane, concatenated with a global arc-length axis so
    that a position lookup for every agent is one ``searchsorted``. Agents move in design-plane
    arc length; the warp maps their positions to the city frame."""

    points: np.ndarray  # [P, 2] design plane
    arc: np.ndarray  # [P] global arc length: lane i occupies base[i] .. base[i] + length[i]
    base: np.ndarray  # [num_lanes]
    first: np.ndarray  # [num_lanes] index of each lane's first point
    last: np.ndarray  # [num_lanes] index of each lane's last point
    length: np.ndarray  # [num_lanes] metres
    curve_speed: np.ndarray  # [num_lanes] comfortable speed through the lane's curve, m/s

    def design_at(self, lane: np.ndarray, s: np.ndarray, lateral: np.ndarray | None = None):
        """Design-plane positions [N, 2] and unit tangents [N, 2] at arc length s on lanes."""
        q = self.base[lane] + np.clip(s, 0.0, self.length[lane])
        i = np.clip(np.searchsorted(self.arc, q, side="right") - 1, self.first[lane], self.last[lane] - 1)
        p0, p1 = self.points[i], self.points[i + 1]
        seg = self.arc[i + 1] - self.arc[i]
        w = ((q - self.arc[i]) / np.maximum(seg, 1e-9))[:, None]
        tangent = (p1 - p0) / np.maximum(seg, 1e-9)[:, None]
        pos = p0 + (p1 - p0) * w
        if lateral is not None:
            pos = pos + np.stack([-tangent[:, 1], tangent[:, 0]], -1) * lateral[:, None]
        return pos, tangent


def lane_geometry(net: RoadNet, lat_accel: float) -> LaneGeometry:
    designs = [lane.design for lane in net.lanes]
    count = np.array([len(d) for d in designs])
    last = np.cumsum(count) - 1
    first = last - count + 1
    points = np.concatenate(designs)
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    seg[last[:-1]] = 0.0  # no length between one lane's end and the next lane's start
    within = np.concatenate([[0.0], np.cumsum(seg)])
    length = within[last] - within[first]
    # a 1 m gap between lanes keeps the global arc axis strictly increasing across lanes
    gap = np.repeat(np.arange(len(designs)) * 1.0, count)
    arc = within + gap
    base = arc[first]
    d_start = points[first + 1] - points[first]
    d_end = points[last] - points[last - 1]
    turn = np.abs(np.arctan2(d_start[:, 0] * d_end[:, 1] - d_start[:, 1] * d_end[:, 0], (d_start * d_end).sum(1)))
    kappa = turn / np.maximum(length, 1.0)
    curve_speed = np.sqrt(lat_accel / np.maximum(kappa, 1e-4))
    return LaneGeometry(points, arc, base, first, last, length, curve_speed)


@dataclass
class Tracks:
    """Simulated ground truth of every agent over the recorded steps."""

    position: np.ndarray  # [N, T, 2] city frame
    heading: np.ndarray  # [N, T]
    speed: np.ndarray  # [N, T]
    active: np.ndarray  # [N, T] the agent exists (has not left the network)
    object_type: list[str]
    on_lane: np.ndarray  # [N] lane-following agent
    maneuver: np.ndarray  # [N] turned at a junction or changed lane during the future steps


class _Rng:
    def __init__(self, rng: np.random.Generator):
        self.r = rng

    def u(self, lo_hi, size=None):
        return self.r.uniform(lo_hi[0], lo_hi[1], size)


def simulate(net: RoadNet, geo: LaneGeometry, style: Style, rng: np.random.Generator, steps: int,
             warmup: int = 20) -> Tracks:
    lane_veh = _simulate_lane_agents(net, geo, style, rng, steps, warmup)
    peds = _simulate_pedestrians(net, style, rng, steps)
    static = _static_objects(net, style, rng, steps)
    parts = [lane_veh, peds, static]
    return Tracks(
        position=np.concatenate([p.position for p in parts]),
        heading=np.concatenate([p.heading for p in parts]),
        speed=np.concatenate([p.speed for p in parts]),
        active=np.concatenate([p.active for p in parts]),
        object_type=sum((p.object_type for p in parts), []),
        on_lane=np.concatenate([p.on_lane for p in parts]),
        maneuver=np.concatenate([p.maneuver for p in parts]),
    )


def _choose_next(net: RoadNet, lane: int, style: Style, rng: np.random.Generator) -> int:
    succ = net.lanes[lane].successors
    if not succ:
        return -1
    if len(succ) == 1:
        return net.lane_index[succ[0]]
    lanes = [net.lanes[net.lane_index[s]] for s in succ]
    w = np.array([(style.turn_prob / 2) if ln.turn != "straight" else (1 - style.turn_prob) for ln in lanes])
    return net.lane_index[succ[rng.choice(len(succ), p=w / w.sum())]]


def _simulate_lane_agents(net, geo, style, rng, steps, warmup) -> Tracks:
    R = _Rng(rng)
    lanes = net.lanes
    n_lanes = len(lanes)
    types = np.array([ln.lane_type for ln in lanes])
    vehicle_lanes = np.flatnonzero((types != "BIKE") & ~np.array([ln.is_intersection for ln in lanes]))
    bike_lanes = np.flatnonzero((types == "BIKE") & ~np.array([ln.is_intersection for ln in lanes]))
    lane_len = geo.length
    # vehicles: spawn by density along non-junction vehicle lanes
    n_veh = rng.poisson(style.vehicle_density * lane_len[vehicle_lanes].sum())
    p = lane_len[vehicle_lanes] / lane_len[vehicle_lanes].sum()
    lane = rng.choice(vehicle_lanes, size=n_veh, p=p)
    kind = np.where(types[lane] == "BUS", "bus", "vehicle").astype(object)
    kind[(kind == "vehicle") & (rng.random(n_veh) < 0.03)] = "motorcyclist"
    n_cyc = int(rng.integers(style.cyclists[0], style.cyclists[1] + 1))
    if len(bike_lanes):
        cyc_lane = rng.choice(bike_lanes, size=n_cyc)
    else:
        right_most = [i for i in vehicle_lanes if lanes[i].right_neighbor is None]
        cyc_lane = rng.choice(right_most, size=n_cyc) if right_most else rng.choice(vehicle_lanes, size=n_cyc)
    lane = np.concatenate([lane, cyc_lane]).astype(np.int64)
    kind = np.concatenate([kind, np.array(["cyclist"] * n_cyc, dtype=object)])
    n = len(lane)
    s = rng.random(n) * lane_len[lane]
    is_cyc = kind == "cyclist"
    is_bus = kind == "bus"
    limit = R.u(style.speed_limit)
    v0 = np.where(is_cyc, R.u((3.5, 7.0), n), limit * R.u(style.speed_factor, n))
    v0 = np.where(rng.random(n) < 0.05, R.u((0.0, 1.0), n), v0)  # a few drivers who are waiting
    length = np.where(is_bus, 12.0, np.where(is_cyc, 1.8, R.u((4.2, 5.2), n)))
    a_max = np.where(is_bus, 0.8, style.accel * R.u((0.8, 1.2), n))
    b_cmf = style.decel * R.u((0.8, 1.2), n)
    headway = style.headway * R.u((0.8, 1.3), n)
    v = v0 * R.u((0.3, 1.0), n)
    nxt = np.array([_choose_next(net, int(ln), style, rng) for ln in lane], dtype=np.int64)
    lat = np.zeros(n)
    lc_target = np.full(n, -1)
    lc_side = np.zeros(n)
    lc_t = np.zeros(n)
    stop_wait = np.zeros(n)
    stop_done = np.zeros(n, bool)
    alive = np.ones(n, bool)
    maneuver = np.zeros(n, bool)
    junction_of = np.array([ln.junction for ln in lanes])
    axis_of = np.array([ln.axis for ln in lanes])
    turn_of = np.array([ln.turn != "straight" for ln in lanes])
    is_inter = np.array([ln.is_intersection for ln in lanes])
    left_nb = np.array([net.lane_index.get(ln.left_neighbor, -1) if ln.left_neighbor else -1 for ln in lanes])
    right_nb = np.array([net.lane_index.get(ln.right_neighbor, -1) if ln.right_neighbor else -1 for ln in lanes])
    lane_width = np.array([ln.width for ln in lanes])
    signal = np.array([j.signal for j in net.junctions] + [False])
    green = np.array([j.green for j in net.junctions] + [1.0])
    phase0 = np.array([j.offset for j in net.junctions] + [0.0])

    total = warmup + steps
    out_pos = np.zeros((n, steps, 2))
    out_head = np.zeros((n, steps))
    out_alive = np.zeros((n, steps), bool)
    idx = np.arange(n)
    for t in range(total):
        time_s = t * DT
        # -- leaders: same lane (sorted by s) and first vehicle on the chosen next lane
        gap = np.full(n, np.inf)
        dv = np.zeros(n)
        order = np.lexsort((s, np.where(alive, lane, -1)))
        lo, hi = order[:-1], order[1:]
        same = (lane[lo] == lane[hi]) & alive[lo] & alive[hi]
        g = s[hi] - s[lo] - (length[hi] + length[lo]) / 2
        gap[lo[same]] = g[same]
        dv[lo[same]] = v[lo[same]] - v[hi[same]]
        first_s = np.full(n_lanes + 1, np.inf)
        first_v = np.zeros(n_lanes + 1)
        np.minimum.at(first_s, np.where(alive, lane, n_lanes), s)
        rank = np.full(n_lanes + 1, -1)
        mask = alive & (s == first_s[lane])
        rank[lane[mask]] = idx[mask]
        first_v[lane[mask]] = v[mask]
        has_next = (nxt >= 0) & ~np.isfinite(gap)
        nn = np.where(nxt >= 0, nxt, n_lanes)
        g2 = lane_len[lane] - s + first_s[nn] - length
        use2 = has_next & np.isfinite(first_s[nn])
        gap[use2] = g2[use2]
        dv[use2] = v[use2] - first_v[nn][use2]
        # -- junction control at the end of the lane
        j = junction_of[lane]
        to_end = lane_len[lane] - s - 1.0
        cycle_axis = (np.floor((time_s + phase0[j]) / green[j]) % 2).astype(int)
        red = (j >= 0) & signal[j] & (cycle_axis != axis_of[lane]) & (to_end > v**2 / (2 * 4.0))
        stopsign = (j >= 0) & ~signal[np.maximum(j, 0)] & (j >= 0) & ~stop_done
        stop_wait = np.where(stopsign & (v < 0.5) & (to_end < 4.0), stop_wait + DT, stop_wait)
        stop_done |= stop_wait > 1.0
        must_stop = red | (stopsign & ~stop_done)
        stop_gap = np.where(must_stop, np.maximum(to_end, 0.1), np.inf)
        closer = stop_gap < gap
        gap = np.where(closer, stop_gap, gap)
        dv = np.where(closer, v, dv)
        # -- IDM with curve speed limits
        vdes = np.minimum(v0, geo.curve_speed[lane])
        s_star = 2.0 + v * headway + v * dv / (2 * np.sqrt(a_max * b_cmf))
        acc = a_max * (1 - (v / np.maximum(vdes, 0.1)) ** 4 - (np.maximum(s_star, 0) / np.maximum(gap, 0.1)) ** 2)
        vc_next = np.where(nxt >= 0, geo.curve_speed[np.maximum(nxt, 0)], np.inf)
        dist_next = np.maximum(lane_len[lane] - s, 1.0)
        need = (v**2 - vc_next**2) / (2 * dist_next)
        acc = np.where(need > 0.3, np.minimum(acc, -need), acc)
        acc = np.clip(acc, -8.0, a_max)
        v = np.maximum(v + acc * DT, 0.0)
        s = s + v * DT
        # -- lane changes
        lc_t = np.where(lc_target >= 0, lc_t + DT, 0.0)
        done = (lc_target >= 0) & (lc_t >= LANE_CHANGE_S)
        if done.any():
            lane[done] = lc_target[done]
            lat[done] = 0.0
            maneuver[done & (t >= warmup + 50)] = True
            lc_target[done] = -1
            for i in np.flatnonzero(done):
                nxt[i] = _choose_next(net, int(lane[i]), style, rng)
        # room to finish: on this lane, or on this one and a following non-junction segment
        room = lane_len[lane] - s + np.where((nxt >= 0) & ~is_inter[np.maximum(nxt, 0)], lane_len[np.maximum(nxt, 0)], 0.0)
        start = (
            alive & (lc_target < 0) & ~is_cyc & (v > 3.0) & ~is_inter[lane]
            & (rng.random(n) < style.lane_change_rate * DT)
            & (room > v * LANE_CHANGE_S + 5.0)
        )
        if start.any():
            go_left = rng.random(n) < 0.5
            target = np.where(go_left, left_nb[lane], right_nb[lane])
            start &= target >= 0
            lc_target = np.where(start, target, lc_target)
            lc_side = np.where(start, np.where(go_left, 1.0, -1.0), lc_side)
            if (start & (t >= warmup + 49)).any():
                maneuver[start & (t >= warmup + 49)] = True
        frac = np.clip(lc_t / LANE_CHANGE_S, 0, 1)
        width = lane_width[lane]
        lat = np.where(lc_target >= 0, lc_side * width * (3 * frac**2 - 2 * frac**3), 0.0)
        # -- moving onto the next lane
        over = alive & (s >= lane_len[lane])
        for i in np.flatnonzero(over):
            while alive[i] and s[i] >= lane_len[lane[i]]:
                if nxt[i] < 0:
                    alive[i] = False
                    break
                s[i] -= lane_len[lane[i]]
                lane[i] = nxt[i]
                if lc_target[i] >= 0:  # carry a lane change on to the neighbour of the new segment
                    lc_target[i] = left_nb[lane[i]] if lc_side[i] > 0 else right_nb[lane[i]]
                    if lc_target[i] < 0:
                        lat[i] = 0.0
                stop_wait[i] = 0.0
                stop_done[i] = False
                if turn_of[lane[i]] and t >= warmup + 49:
                    maneuver[i] = True
                nxt[i] = _choose_next(net, int(lane[i]), style, rng)
        if t >= warmup:
            k = t - warmup
            pos, tangent = geo.design_at(lane, s, lat)
            heading = np.arctan2(tangent[:, 1], tangent[:, 0])
            if (lc_target >= 0).any():  # the heading turns into a lane change
                dlat = lc_side * width * 6 * (frac - frac**2) / LANE_CHANGE_S
                heading = heading + np.where(lc_target >= 0, np.arctan2(dlat, np.maximum(v, 0.5)), 0.0)
            out_pos[:, k] = pos
            out_head[:, k] = heading
            out_alive[:, k] = alive
    # to the city frame: positions through the warp, headings along the warped direction
    city = net.warp(out_pos)
    ahead = net.warp(out_pos + np.stack([np.cos(out_head), np.sin(out_head)], -1) * 0.5)
    heading = np.arctan2(ahead[..., 1] - city[..., 1], ahead[..., 0] - city[..., 0])
    speed = np.linalg.norm(np.gradient(city, DT, axis=1), axis=-1)
    return Tracks(city, heading, speed, out_alive, list(kind), np.ones(n, bool), maneuver)


def _simulate_pedestrians(net: RoadNet, style: Style, rng: np.random.Generator, steps: int) -> Tracks:
    """Pedestrians walk along sidewalks or across crosswalks, pause, and turn back at path ends."""
    R = _Rng(rng)
    n = int(rng.integers(style.pedestrians[0], style.pedestrians[1] + 1))
    paths = list(net.sidewalks)
    for j in net.junctions:
        paths += [cw.mean(axis=0) for cw in j.crosswalks]  # the centre line of each crosswalk
    if n == 0 or not paths:
        return _empty_tracks(steps)
    pick = rng.integers(0, len(paths), size=n)
    a = np.array([paths[i][0] for i in pick])
    b = np.array([paths[i][1] for i in pick])
    lat = rng.normal(0, 0.6, size=(n, 1))
    d = b - a
    length = np.linalg.norm(d, axis=1)
    u = d / length[:, None]
    normal = np.stack([-u[:, 1], u[:, 0]], -1)
    speed = R.u((0.9, 1.7), n)
    s0 = rng.random(n) * length
    direction = np.where(rng.random(n) < 0.5, 1.0, -1.0)
    t = np.arange(steps) * DT
    # piecewise speed: walk, maybe pause for a while, walk on
    pause_at = R.u((0, steps * DT), n)
    pause_len = np.where(rng.random(n) < 0.3, R.u((1.0, 5.0), n), 0.0)
    standing = rng.random(n) < 0.15
    moving_time = np.clip(t[None] - np.clip(t[None] - pause_at[:, None], 0, pause_len[:, None]), 0, None)
    travelled = np.where(standing[:, None], 0.0, speed[:, None] * moving_time) * direction[:, None]
    # reflect at the path ends (walk back)
    p = np.mod(s0[:, None] + travelled, 2 * length[:, None])
    s = np.where(p > length[:, None], 2 * length[:, None] - p, p)
    design = a[:, None] + u[:, None] * s[..., None] + normal[:, None] * lat[:, None]
    pos = net.warp(design)
    vel = np.gradient(pos, DT, axis=1)
    spd = np.linalg.norm(vel, axis=-1)
    head = np.arctan2(vel[..., 1], vel[..., 0])
    # a standing pedestrian keeps facing one way
    head = np.where(spd < 0.1, rng.uniform(-np.pi, np.pi, size=(n, 1)), head)
    return Tracks(pos, head, spd, np.ones((n, steps), bool), ["pedestrian"] * n, np.zeros(n, bool), np.zeros(n, bool))


def _static_objects(net: RoadNet, style: Style, rng: np.random.Generator, steps: int) -> Tracks:
    """Parked cars along the kerb, plus static, construction and background objects."""
    total_len = sum(np.linalg.norm(w[1] - w[0]) for w in net.sidewalks)
    n_parked = rng.poisson(style.parked_per_100m * total_len / 100 / 2)
    n_other = int(rng.integers(0, 8))
    n = n_parked + n_other
    if n == 0 or not net.sidewalks:
        return _empty_tracks(steps)
    pick = rng.integers(0, len(net.sidewalks), size=n)
    a = np.array([net.sidewalks[i][0] for i in pick])
    b = np.array([net.sidewalks[i][1] for i in pick])
    f = rng.random(n)[:, None]
    u = (b - a) / np.linalg.norm(b - a, axis=1, keepdims=True)
    # sidewalks run with the road on their left; the kerb is 2.5 m towards it, and parked cars
    # stand on the shoulder just outside the kerb
    inward = np.stack([-u[:, 1], u[:, 0]], -1)
    shift = np.where(np.arange(n)[:, None] < n_parked, 1.5, rng.uniform(0.0, 2.0, size=(n, 1)))
    design = a + (b - a) * f + inward * shift
    pos = net.warp(design)
    heading = np.arctan2(*(net.warp(design + u) - pos).T[::-1]) + np.where(rng.random(n) < 0.5, 0, np.pi)
    kinds = ["vehicle"] * n_parked + list(rng.choice(["static", "construction", "background", "riderless_bicycle"],
                                                    size=n_other, p=[0.45, 0.2, 0.2, 0.15]))
    return Tracks(
        np.repeat(pos[:, None], steps, axis=1), np.repeat(heading[:, None], steps, axis=1), np.zeros((n, steps)),
        np.ones((n, steps), bool), kinds, np.zeros(n, bool), np.zeros(n, bool),
    )


def _empty_tracks(steps: int) -> Tracks:
    return Tracks(np.zeros((0, steps, 2)), np.zeros((0, steps)), np.zeros((0, steps)), np.zeros((0, steps), bool),
                  [], np.zeros(0, bool), np.zeros(0, bool))
