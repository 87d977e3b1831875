"""Synthetic road networks: a warped grid of multi-lane roads and junctions.

Roads are laid out in a flat "design" plane (u, v) as a grid; a smooth warp then bends them into
curves and places them in city coordinates. Every lane segment carries the AV2 map attributes:
3-D left/right boundaries with mark types, successors, predecessors, neighbours, lane type and
``is_intersection``. Junctions get left/straight/right connector lanes, crosswalks and a control
(signal or all-way stop).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from forecast_peft.data.synth.styles import Style

MARGIN_M = 2.0  # between a junction's crossing lanes and its stop lines
SAMPLE_M = 10.0  # design-space spacing of straight lane points (the warp bends them gently)


@dataclass
class Lane:
    id: int
    lane_type: str  # VEHICLE, BIKE or BUS
    design: np.ndarray  # [K, 2] centreline in the design plane, in travel order
    width: float
    is_intersection: bool = False
    successors: list[int] = field(default_factory=list)
    predecessors: list[int] = field(default_factory=list)
    left_neighbor: int | None = None
    right_neighbor: int | None = None
    left_mark: str = "NONE"
    right_mark: str = "NONE"
    junction: int = -1  # junction this lane leads into (its end is a stop line), else -1
    axis: int = 0  # 0: along u, 1: along v (which signal phase governs it)
    turn: str = "straight"  # for connectors: left, straight or right


@dataclass
class Junction:
    id: int
    centre: np.ndarray  # design plane
    signal: bool
    green: float  # seconds of green per axis
    offset: float  # phase offset, seconds
    crosswalks: list[np.ndarray] = field(default_factory=list)  # [2 edges, 2 points, 2]


@dataclass
class RoadNet:
    lanes: list[Lane]
    junctions: list[Junction]
    drivable: list[np.ndarray]  # design-plane polygons
    sidewalks: list[np.ndarray]  # design-plane straight paths [2, 2], the road on their left
    warp: Warp
    lane_index: dict[int, int]


class Warp:
    """Smooth map from the design plane to city coordinates (bends, rotation, translation)."""

    def __init__(self, rng: np.random.Generator, style: Style):
        self.amp = style.bend * rng.uniform(0.5, 1.0, size=2)
        self.k = 2 * np.pi / (style.bend_wavelength * rng.uniform(0.8, 1.25, size=2))
        self.phase = rng.uniform(0, 2 * np.pi, size=2)
        a = rng.uniform(-np.pi, np.pi)
        self.rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        self.shift = rng.uniform(-3000, 3000, size=2).round(2)

    def __call__(self, p: np.ndarray) -> np.ndarray:
        u, v = p[..., 0], p[..., 1]
        bent = np.stack(
            [
                u + self.amp[0] * np.sin(self.k[0] * v + self.phase[0]),
                v + self.amp[1] * np.sin(self.k[1] * u + self.phase[1]),
            ],
            axis=-1,
        )
        return bent @ self.rot.T + self.shift

    @staticmethod
    def height(p: np.ndarray) -> np.ndarray:
        """Ground elevation (m) at city points: a gentle slope, like a real map's z."""
        return 20.0 + 0.004 * p[..., 0] - 0.003 * p[..., 1]


_FRACTIONS: dict[int, np.ndarray] = {}


def _line(a: np.ndarray, b: np.ndarray, spacing: float = SAMPLE_M) -> np.ndarray:
    n = max(2, math.ceil(math.hypot(b[0] - a[0], b[1] - a[1]) / spacing) + 1)
    if n not in _FRACTIONS:
        _FRACTIONS[n] = np.linspace(0, 1, n)[:, None]
    return a + (b - a) * _FRACTIONS[n]


def _bezier(p0: np.ndarray, d0: np.ndarray, p1: np.ndarray, d1: np.ndarray, n: int = 10) -> np.ndarray:
    """Quadratic curve from p0 (heading d0) to p1 (heading d1); a line when they are parallel."""
    cross = d0[0] * d1[1] - d0[1] * d1[0]
    if abs(cross) < 1e-6:
        return _line(p0, p1)
    # control point: where the two tangent lines meet
    t = ((p1 - p0)[0] * d1[1] - (p1 - p0)[1] * d1[0]) / cross
    c = p0 + t * d0
    if n not in _FRACTIONS:
        _FRACTIONS[n] = np.linspace(0, 1, n)[:, None]
    s = _FRACTIONS[n]
    return (1 - s) ** 2 * p0 + 2 * (1 - s) * s * c + s**2 * p1


class _Builder:
    def __init__(self, rng: np.random.Generator, style: Style):
        self.rng = rng
        self.style = style
        self.lanes: list[Lane] = []
        self.next_id = int(rng.integers(10_000_000, 400_000_000))

    def add(self, **kw) -> Lane:
        lane = Lane(id=self.next_id, **kw)
        self.next_id += int(self.rng.integers(1, 40))
        self.lanes.append(lane)
        return lane


def build_roadnet(rng: np.random.Generator, style: Style, half_size: float = 210.0) -> RoadNet:
    """A warped grid covering [-half_size, half_size]^2 of the design plane around (0, 0)."""
    b = _Builder(rng, style)
    # Grid lines: positions of vertical roads (x = const) and horizontal roads (y = const).
    lines = []
    for _ in range(2):
        first = -rng.uniform(0, style.block[1])
        pos = [first]
        while pos[-1] < half_size:
            pos.append(pos[-1] + rng.uniform(*style.block))
        pos = np.array([p for p in pos if -half_size < p < half_size] or [0.0])
        # most scenes are mined near a junction: shift the grid so one is close to the centre
        if rng.random() < 0.7:
            pos = pos - pos[np.argmin(np.abs(pos))] + rng.uniform(-35.0, 35.0)
            pos = pos[np.abs(pos) < half_size]
        lines.append(pos)
    # Per road: lane layout of one direction, innermost first: [(type, width), ...].
    roads = []  # (axis, coordinate, layout)
    for axis in (0, 1):
        for c in lines[1 - axis]:  # a road along u sits at v = c
            n = int(rng.choice(style.lanes))
            width = rng.uniform(*style.lane_width)
            layout = [("VEHICLE", width)] * n
            if n >= 2 and rng.random() < style.bus_lane_prob:
                layout[-1] = ("BUS", width)
            if rng.random() < style.bike_lane_prob:
                layout = layout + [("BIKE", rng.uniform(1.6, 2.0))]
            roads.append((axis, float(c), layout))
    half_width = {(axis, c): sum(w for _, w in layout) for axis, c, layout in roads}

    junctions: list[Junction] = []
    jindex = {}
    for x in lines[0]:
        for y in lines[1]:
            j = Junction(
                id=len(junctions),
                centre=np.array([x, y]),
                signal=bool(rng.random() < style.signal_prob),
                green=rng.uniform(*style.cycle),
                offset=rng.uniform(0, 60),
            )
            jindex[(round(x, 6), round(y, 6))] = j
            junctions.append(j)

    # ends[(junction id, axis, sign, "in"/"out")] = {lane position k: lane}
    ends: dict[tuple, dict[int, Lane]] = {}
    drivable, sidewalks = [], []
    for axis, c, layout in roads:
        crossings = lines[axis]  # junction positions along this road
        ext = [half_width[(1 - axis, x)] + MARGIN_M for x in crossings]
        cuts = [-half_size - 40.0]
        for x, e in zip(crossings, ext):
            cuts += [x - e, x + e]
        cuts.append(half_size + 40.0)
        total = sum(w for _, w in layout)
        for p in range(len(cuts) // 2):
            t0, t1 = cuts[2 * p], cuts[2 * p + 1]
            if t1 - t0 < 4.0:
                continue
            to_uv = lambda t, lat, axis=axis, c=c: (
                np.stack([t, c + lat], -1) if axis == 0 else np.stack([c + lat, t], -1)
            )
            drivable.append(to_uv(np.array([t0, t1, t1, t0]), np.array([-total, -total, total, total])))
            for side in (-1, 1):
                # ordered so that the road lies on the sidewalk's left
                ends_t = np.array([t0, t1]) if (side < 0) == (axis == 0) else np.array([t1, t0])
                sidewalks.append(to_uv(ends_t, np.full(2, side * (total + 2.5))))
            # split points shared by all lanes of the piece, so neighbours line up
            n_seg = max(1, int(round((t1 - t0) / rng.uniform(*style.segment_length))))
            splits = np.linspace(t0, t1, n_seg + 1)
            j_start = jindex[_key(axis, c, crossings[p - 1])] if p >= 1 else None
            j_end = jindex[_key(axis, c, crossings[p])] if p < len(crossings) else None
            for sign in (1, -1):
                order = splits if sign > 0 else splits[::-1]
                lat_off = np.cumsum([0.0] + [w for _, w in layout])
                rows = []  # rows[k] = list of lanes along the piece for lane position k
                for k, (ltype, w) in enumerate(layout):
                    lat = (lat_off[k] + w / 2) * (-sign if axis == 0 else sign)
                    row = []
                    ends_uv = [np.array((s, c + lat) if axis == 0 else (c + lat, s)) for s in order]
                    for a_uv, b_uv in zip(ends_uv[:-1], ends_uv[1:]):
                        pts = _line(a_uv, b_uv)
                        lane = b.add(lane_type=ltype, design=pts, width=w, axis=axis)
                        if row:
                            row[-1].successors.append(lane.id)
                            lane.predecessors.append(row[-1].id)
                        row.append(lane)
                    rows.append(row)
                for k, row in enumerate(rows):
                    for i, lane in enumerate(row):
                        lane.left_mark = "DOUBLE_SOLID_YELLOW" if k == 0 else "DASHED_WHITE"
                        lane.right_mark = (
                            "SOLID_WHITE" if k == len(rows) - 1 or layout[k + 1][0] == "BIKE" else "DASHED_WHITE"
                        )
                        if layout[k][0] == "BIKE":
                            lane.left_mark = "SOLID_WHITE"
                        if k > 0 and layout[k][0] != "BIKE" and layout[k - 1][0] != "BIKE":
                            lane.left_neighbor = rows[k - 1][i].id
                        if k + 1 < len(rows) and layout[k + 1][0] != "BIKE" and layout[k][0] != "BIKE":
                            lane.right_neighbor = rows[k + 1][i].id
                j_in, j_out = (j_end, j_start) if sign > 0 else (j_start, j_end)
                if j_in is not None:
                    ends[(j_in.id, axis, sign, "in")] = {k: row[-1] for k, row in enumerate(rows)}
                    for row in rows:
                        row[-1].junction = j_in.id
                if j_out is not None:
                    ends[(j_out.id, axis, sign, "out")] = {k: row[0] for k, row in enumerate(rows)}
    for (jid, axis, sign, kind), lanes_in in list(ends.items()):
        if kind == "in":
            _connect_approach(b, junctions[jid], axis, sign, lanes_in, ends)
    for j in junctions:
        _crosswalks(j, half_width)
    warp = Warp(rng, style)
    return RoadNet(
        lanes=b.lanes,
        junctions=junctions,
        drivable=drivable,
        sidewalks=sidewalks,
        warp=warp,
        lane_index={lane.id: i for i, lane in enumerate(b.lanes)},
    )


def _key(axis: int, c: float, t: float) -> tuple[float, float]:
    x, y = (t, c) if axis == 0 else (c, t)
    return (round(x, 6), round(y, 6))


def _connect_approach(b: _Builder, j: Junction, axis: int, sign: int, lanes_in: dict, ends: dict) -> None:
    """Connector lanes from one approach of a junction: straight, right and left."""
    right = (1 - axis, -sign) if axis == 0 else (1 - axis, sign)
    left = (1 - axis, sign) if axis == 0 else (1 - axis, -sign)
    for turn, (oaxis, osign) in (("straight", (axis, sign)), ("right", right), ("left", left)):
        lanes_out = ends.get((j.id, oaxis, osign, "out"))
        if not lanes_out:
            continue
        for k_in, k_out in _lane_pairs(lanes_in, lanes_out, turn):
            a, z = lanes_in[k_in], lanes_out[k_out]
            d0 = a.design[-1] - a.design[-2]
            d1 = z.design[1] - z.design[0]
            pts = _bezier(a.design[-1], d0 / math.hypot(*d0), z.design[0], d1 / math.hypot(*d1))
            conn = b.add(
                lane_type=a.lane_type if a.lane_type == "BIKE" else z.lane_type if z.lane_type != "BUS" else "VEHICLE",
                design=pts,
                width=(a.width + z.width) / 2,
                is_intersection=True,
                axis=axis,
                turn=turn,
            )
            conn.predecessors.append(a.id)
            conn.successors.append(z.id)
            a.successors.append(conn.id)
            z.predecessors.append(conn.id)


def _lane_pairs(lanes_in: dict[int, Lane], lanes_out: dict[int, Lane], turn: str) -> list[tuple[int, int]]:
    def kinds(lanes, bike):
        return sorted(k for k, lane in lanes.items() if (lane.lane_type == "BIKE") == bike)

    pairs = []
    for bike in (False, True):
        ki, ko = kinds(lanes_in, bike), kinds(lanes_out, bike)
        if not ki or not ko:
            continue
        if turn == "straight":
            pairs += [(k, ko[min(i, len(ko) - 1)]) for i, k in enumerate(ki)]
        elif turn == "right":
            pairs.append((ki[-1], ko[-1]))
        elif not bike:  # left turns from the innermost lane; bikes turn left as pedestrians do
            pairs.append((ki[0], ko[0]))
    return pairs


def _crosswalks(j: Junction, half_width: dict) -> None:
    x, y = j.centre
    hv = half_width.get((1, x), 0.0) + MARGIN_M  # the vertical road's half width
    hh = half_width.get((0, y), 0.0) + MARGIN_M
    for side in (-1, 1):
        # across the horizontal road, just outside the junction on each side
        u0 = x + side * (hv - 0.5)
        u1 = x + side * (hv - 3.5)
        j.crosswalks.append(np.array([[[u0, y - hh + 1], [u0, y + hh - 1]], [[u1, y - hh + 1], [u1, y + hh - 1]]]))
        v0 = y + side * (hh - 0.5)
        v1 = y + side * (hh - 3.5)
        j.crosswalks.append(np.array([[[x - hv + 1, v0], [x + hv - 1, v0]], [[x - hv + 1, v1], [x + hv - 1, v1]]]))
