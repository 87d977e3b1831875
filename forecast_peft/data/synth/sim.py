"""Traffic on a synthetic road network: lane following with IDM car following, route choice at
junctions, signals and all-way stops, left turners giving way to oncoming traffic, lane changes,
cyclists, pedestrians, parked and static objects. Vectorised over agents; one call simulates the
whole 11 s (plus a warm-up)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from forecast_peft.data.synth.roadnet import RoadNet
from forecast_peft.data.synth.styles import Style

DT = 0.1
LANE_SPACING_M = 1.0
LANE_CHANGE_S = 3.5
YIELD_ZONE_M = 40.0  # a left turner looks for oncoming traffic from this far before the stop line
STRAIGHT, RIGHT, LEFT = 0, 1, 2  # connector turn codes
CLEAR_FRACTION = 0.8  # past this share of its connector a vehicle no longer blocks crossing traffic


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
    yield_to: np.ndarray  # [N, 2] (agent given way to at a left turn, recorded step) or -1
    lane: np.ndarray  # [N, T] lane index of lane-following agents (-1 for the others)
    arc: np.ndarray  # [N, T] arc length along that lane, m (0 for the others)


class _Rng:
    def __init__(self, rng: np.random.Generator):
        self.r = rng

    def u(self, lo_hi, size=None):
        return self.r.uniform(lo_hi[0], lo_hi[1], size)


def simulate(
    net: RoadNet, geo: LaneGeometry, style: Style, rng: np.random.Generator, steps: int, warmup: int = 20
) -> Tracks:
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
        yield_to=np.concatenate([p.yield_to for p in parts]),
        lane=np.concatenate([p.lane for p in parts]),
        arc=np.concatenate([p.arc for p in parts]),
    )


def _successor_table(net: RoadNet, style: Style) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Successors of every lane as CSR arrays, with route-choice weights (turns vs straight)."""
    ptr, idx, weight = [0], [], []
    for lane in net.lanes:
        succ = [net.lane_index[s] for s in lane.successors]
        w = [(style.turn_prob / 2) if net.lanes[k].turn != "straight" else (1 - style.turn_prob) for k in succ]
        total = sum(w) or 1.0
        idx += succ
        weight += [x / total for x in w]
        ptr.append(len(idx))
    return np.array(ptr, np.int64), np.array(idx, np.int64), np.array(weight)


@njit(cache=True)
def _choose(lane, ptr, idx, weight):
    a, b = ptr[lane], ptr[lane + 1]
    if a == b:
        return -1
    r = np.random.random()
    acc = 0.0
    for k in range(a, b):
        acc += weight[k]
        if r < acc:
            return idx[k]
    return idx[b - 1]


@njit(cache=True)
def _oncoming(i, j, opposite, lane, s, v, alive, nxt, lane_len, junction_of, dir_of, turn_code, conn_junction, gap):
    """The oncoming vehicle a left turner at junction j must give way to, or -1: one (approach
    direction ``opposite``) going straight or right that reaches its stop line within ``gap``
    seconds, waits at it, or is crossing the junction and has not passed the turner's path yet."""
    for k in range(lane.shape[0]):
        if k == i or not alive[k]:
            continue
        lk = lane[k]
        if dir_of[lk] != opposite:
            continue
        if junction_of[lk] == j and nxt[k] >= 0 and turn_code[nxt[k]] != LEFT:
            dist = lane_len[lk] - s[k]
            if dist < 3.0 or (dist < 80.0 and dist / max(v[k], 0.5) < gap):
                return k
        elif conn_junction[lk] == j and turn_code[lk] != LEFT and s[k] < 0.6 * lane_len[lk]:
            return k
    return -1


@njit(cache=True)
def _crossing_busy(j, axis, lane, s, alive, stop_done, lane_len, junction_of, dir_of, conn_junction):
    """Whether a vehicle from the other axis goes first at all-way stop j: it is inside the
    junction short of the end of its connector, or has finished its stop and is starting off."""
    for k in range(lane.shape[0]):
        lk = lane[k]
        if not alive[k] or dir_of[lk] < 0 or (dir_of[lk] >> 1) == axis:
            continue
        if conn_junction[lk] == j and s[k] < CLEAR_FRACTION * lane_len[lk]:
            return True
        if junction_of[lk] == j and stop_done[k]:
            return True
    return False


@njit(cache=True)
def _run_lane_agents(
    seed,
    lane,
    s,
    v,
    v0,
    length,
    a_max,
    b_cmf,
    headway,
    is_cyc,
    lane_len,
    curve_speed,
    junction_of,
    is_inter,
    left_nb,
    right_nb,
    lane_width,
    succ_ptr,
    succ_idx,
    succ_w,
    signal,
    green,
    phase0,
    dir_of,
    turn_code,
    conn_junction,
    gap_accept,
    lane_change_rate,
    warmup,
    steps,
    out_lane,
    out_s,
    out_lat,
    out_dhead,
    out_alive,
    maneuver,
    yield_to,
):
    """IDM lane following with signals, all-way stops, yielding on left turns, curve speeds,
    route choice and lane changes; writes the lane, arc length, lateral offset and heading offset
    of every recorded step. ``yield_to[i]`` = (the agent i first gave way to, recorded step), or -1.
    """
    np.random.seed(seed)
    n = lane.shape[0]
    n_lanes = lane_len.shape[0]
    nxt = np.empty(n, np.int64)
    for i in range(n):
        nxt[i] = _choose(lane[i], succ_ptr, succ_idx, succ_w)
    lat = np.zeros(n)
    lc_target = np.full(n, -1, np.int64)
    lc_side = np.zeros(n)
    lc_t = np.zeros(n)
    stop_wait = np.zeros(n)
    stop_done = np.zeros(n, np.bool_)
    alive = np.ones(n, np.bool_)
    gap = np.empty(n)
    dv = np.empty(n)
    key = np.empty(n)
    first_s = np.empty(n_lanes)
    first_v = np.empty(n_lanes)
    future = warmup + 49  # manoeuvres from the present step on count
    for t in range(warmup + steps):
        time_s = t * DT
        for i in range(n):
            key[i] = (lane[i] if alive[i] else n_lanes) * 1.0e5 + s[i]
        order = np.argsort(key)
        first_s[:] = np.inf
        gap[:] = np.inf
        dv[:] = 0.0
        for k in range(n):
            i = order[k]
            if alive[i] and s[i] < first_s[lane[i]]:
                first_s[lane[i]] = s[i]
                first_v[lane[i]] = v[i]
            if k + 1 < n:
                j = order[k + 1]
                if alive[i] and alive[j] and lane[i] == lane[j]:
                    gap[i] = s[j] - s[i] - 0.5 * (length[i] + length[j])
                    dv[i] = v[i] - v[j]
        for i in range(n):
            if not alive[i]:
                continue
            ln = lane[i]
            if gap[i] == np.inf and nxt[i] >= 0 and first_s[nxt[i]] < np.inf:
                gap[i] = lane_len[ln] - s[i] + first_s[nxt[i]] - length[i]
                dv[i] = v[i] - first_v[nxt[i]]
            # junction control at the stop line
            j = junction_of[ln]
            to_end = lane_len[ln] - s[i] - 1.0
            must_stop = False
            if j >= 0:
                if signal[j]:
                    green_axis = int(np.floor((time_s + phase0[j]) / green[j])) % 2
                    can_stop = to_end > v[i] * v[i] / 8.0
                    must_stop = green_axis != dir_of[ln] >> 1 and can_stop
                    if (
                        not must_stop
                        and can_stop
                        and to_end < YIELD_ZONE_M
                        and nxt[i] >= 0
                        and turn_code[nxt[i]] == LEFT
                    ):
                        k = _oncoming(
                            i,
                            j,
                            dir_of[ln] ^ 1,
                            lane,
                            s,
                            v,
                            alive,
                            nxt,
                            lane_len,
                            junction_of,
                            dir_of,
                            turn_code,
                            conn_junction,
                            gap_accept[i],
                        )
                        must_stop = k >= 0
                        if must_stop and t >= warmup and yield_to[i, 0] < 0:
                            yield_to[i, 0] = k
                            yield_to[i, 1] = t - warmup
                elif not stop_done[i]:  # all-way stop: halt at the line, go when no crossing traffic has
                    if v[i] < 0.5 and to_end < 4.0:  # gone or is going first
                        stop_wait[i] += DT
                        if stop_wait[i] > 1.0 and not _crossing_busy(
                            j, dir_of[ln] >> 1, lane, s, alive, stop_done, lane_len, junction_of, dir_of, conn_junction
                        ):
                            stop_done[i] = True
                    must_stop = not stop_done[i]
            if must_stop and max(to_end, 0.1) < gap[i]:
                gap[i] = max(to_end, 0.1)
                dv[i] = v[i]
            vdes = min(v0[i], curve_speed[ln])
            s_star = max(2.0 + v[i] * headway[i] + v[i] * dv[i] / (2.0 * np.sqrt(a_max[i] * b_cmf[i])), 0.0)
            acc = a_max[i] * (1.0 - (v[i] / max(vdes, 0.1)) ** 4 - (s_star / max(gap[i], 0.1)) ** 2)
            if nxt[i] >= 0:  # slow down before a sharp connector
                need = (v[i] ** 2 - curve_speed[nxt[i]] ** 2) / (2.0 * max(lane_len[ln] - s[i], 1.0))
                if need > 0.3:
                    acc = min(acc, -need)
            acc = min(max(acc, -8.0), a_max[i])
            v[i] = max(v[i] + acc * DT, 0.0)
            s[i] += v[i] * DT
            # lane changes
            if lc_target[i] >= 0:
                lc_t[i] += DT
                if lc_t[i] >= LANE_CHANGE_S:
                    lane[i] = lc_target[i]
                    ln = lane[i]
                    lc_target[i] = -1
                    lc_t[i] = 0.0
                    lat[i] = 0.0
                    nxt[i] = _choose(ln, succ_ptr, succ_idx, succ_w)
            elif (not is_cyc[i]) and v[i] > 3.0 and not is_inter[ln] and np.random.random() < lane_change_rate * DT:
                room = lane_len[ln] - s[i]
                if nxt[i] >= 0 and not is_inter[nxt[i]]:
                    room += lane_len[nxt[i]]
                side = 1.0 if np.random.random() < 0.5 else -1.0
                target = left_nb[ln] if side > 0 else right_nb[ln]
                if target >= 0 and room > v[i] * LANE_CHANGE_S + 5.0:
                    lc_target[i] = target
                    lc_side[i] = side
                    lc_t[i] = 0.0
                    if t >= future:
                        maneuver[i] = True
            frac = min(lc_t[i] / LANE_CHANGE_S, 1.0)
            lat[i] = lc_side[i] * lane_width[ln] * (3 * frac**2 - 2 * frac**3) if lc_target[i] >= 0 else 0.0
            # onto the next lane
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
                        lc_t[i] = 0.0
                stop_wait[i] = 0.0
                stop_done[i] = False
                if turn_code[lane[i]] != STRAIGHT and t >= future:
                    maneuver[i] = True
                nxt[i] = _choose(lane[i], succ_ptr, succ_idx, succ_w)
        if t >= warmup:
            k = t - warmup
            for i in range(n):
                out_lane[i, k] = lane[i]
                out_s[i, k] = s[i]
                out_lat[i, k] = lat[i]
                out_alive[i, k] = alive[i]
                if lc_target[i] >= 0:
                    frac = min(lc_t[i] / LANE_CHANGE_S, 1.0)
                    dlat = lc_side[i] * lane_width[lane[i]] * 6 * (frac - frac**2) / LANE_CHANGE_S
                    out_dhead[i, k] = np.arctan2(dlat, max(v[i], 0.5))
                else:
                    out_dhead[i, k] = 0.0


def _approach_directions(net: RoadNet) -> tuple[np.ndarray, np.ndarray]:
    """Per lane: the direction it approaches its junction from (2 * axis + heading sign; -1 for
    lanes that end nowhere), connectors inheriting their approach lane's; and the junction a
    connector crosses (-1 for other lanes). Opposite directions differ in the lowest bit."""
    dir_of = np.full(len(net.lanes), -1, np.int64)
    conn_junction = np.full(len(net.lanes), -1, np.int64)
    for k, ln in enumerate(net.lanes):
        if ln.junction >= 0:
            d = ln.design[-1] - ln.design[-2]
            dir_of[k] = 2 * ln.axis + int(d[ln.axis] > 0)
    for k, ln in enumerate(net.lanes):
        if ln.is_intersection and ln.predecessors:
            pred = net.lane_index[ln.predecessors[0]]
            dir_of[k] = dir_of[pred]
            conn_junction[k] = net.lanes[pred].junction
    return dir_of, conn_junction


def _simulate_lane_agents(net, geo, style, rng, steps, warmup) -> Tracks:
    R = _Rng(rng)
    lanes = net.lanes
    types = np.array([ln.lane_type for ln in lanes])
    is_inter = np.array([ln.is_intersection for ln in lanes])
    vehicle_lanes = np.flatnonzero((types != "BIKE") & ~is_inter)
    bike_lanes = np.flatnonzero((types == "BIKE") & ~is_inter)
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
    ptr, idx, weight = _successor_table(net, style)
    lane_index = net.lane_index
    dir_of, conn_junction = _approach_directions(net)
    gap_accept = R.u(style.gap_accept, n)
    out_lane = np.zeros((n, steps), np.int64)
    out_s = np.zeros((n, steps))
    out_lat = np.zeros((n, steps))
    out_dhead = np.zeros((n, steps))
    out_alive = np.zeros((n, steps), np.bool_)
    maneuver = np.zeros(n, np.bool_)
    yield_to = np.full((n, 2), -1, np.int64)
    _run_lane_agents(
        int(rng.integers(2**31 - 1)),
        lane,
        s,
        v,
        v0,
        length,
        a_max,
        b_cmf,
        headway,
        is_cyc,
        lane_len,
        geo.curve_speed,
        np.array([ln.junction for ln in lanes]),
        is_inter,
        np.array([lane_index.get(ln.left_neighbor, -1) for ln in lanes]),
        np.array([lane_index.get(ln.right_neighbor, -1) for ln in lanes]),
        np.array([ln.width for ln in lanes]),
        ptr,
        idx,
        weight,
        np.array([j.signal for j in net.junctions] + [False]),
        np.array([j.green for j in net.junctions] + [1.0]),
        np.array([j.offset for j in net.junctions] + [0.0]),
        dir_of,
        np.array([{"straight": STRAIGHT, "right": RIGHT, "left": LEFT}[ln.turn] for ln in lanes]),
        conn_junction,
        gap_accept,
        style.lane_change_rate,
        warmup,
        steps,
        out_lane,
        out_s,
        out_lat,
        out_dhead,
        out_alive,
        maneuver,
        yield_to,
    )
    pos, tangent = geo.design_at(out_lane.ravel(), out_s.ravel(), out_lat.ravel())
    pos = pos.reshape(n, steps, 2)
    heading = np.arctan2(tangent[:, 1], tangent[:, 0]).reshape(n, steps) + out_dhead
    # to the city frame: positions through the warp, headings along the warped direction
    city = net.warp(pos)
    ahead = net.warp(pos + np.stack([np.cos(heading), np.sin(heading)], -1) * 0.5)
    heading = np.arctan2(ahead[..., 1] - city[..., 1], ahead[..., 0] - city[..., 0])
    speed = np.linalg.norm(np.gradient(city, DT, axis=1), axis=-1)
    return Tracks(city, heading, speed, out_alive, list(kind), np.ones(n, bool), maneuver, yield_to, out_lane, out_s)


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
    return Tracks(
        pos,
        head,
        spd,
        np.ones((n, steps), bool),
        ["pedestrian"] * n,
        np.zeros(n, bool),
        np.zeros(n, bool),
        *_off_lane(n, steps),
    )


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
    kinds = ["vehicle"] * n_parked + list(
        rng.choice(
            ["static", "construction", "background", "riderless_bicycle"], size=n_other, p=[0.45, 0.2, 0.2, 0.15]
        )
    )
    return Tracks(
        np.repeat(pos[:, None], steps, axis=1),
        np.repeat(heading[:, None], steps, axis=1),
        np.zeros((n, steps)),
        np.ones((n, steps), bool),
        kinds,
        np.zeros(n, bool),
        np.zeros(n, bool),
        *_off_lane(n, steps),
    )


def _empty_tracks(steps: int) -> Tracks:
    return Tracks(
        np.zeros((0, steps, 2)),
        np.zeros((0, steps)),
        np.zeros((0, steps)),
        np.zeros((0, steps), bool),
        [],
        np.zeros(0, bool),
        np.zeros(0, bool),
        *_off_lane(0, steps),
    )


def _off_lane(n: int, steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """yield_to, lane and arc of agents that do not follow lanes."""
    return np.full((n, 2), -1, np.int64), np.full((n, steps), -1, np.int64), np.zeros((n, steps))
