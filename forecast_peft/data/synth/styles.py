"""Traffic styles of the synthetic generator: what differs between cities."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Style:
    name: str
    description: str
    block: tuple[float, float]  # distance between junctions along a road, metres
    lanes: tuple[int, ...]  # vehicle lanes per direction to draw from
    lane_width: tuple[float, float]
    segment_length: tuple[float, float]  # lane segments are split at about this length
    bend: float  # amplitude (m) of the smooth warp that curves the roads
    bend_wavelength: float
    speed_limit: tuple[float, float]  # m/s
    speed_factor: tuple[float, float]  # a driver's desired speed / limit
    accel: float  # IDM maximum acceleration, m/s^2
    decel: float  # IDM comfortable deceleration
    headway: float  # IDM time headway, s
    turn_prob: float  # chance of turning (left or right) at a junction
    gap_accept: tuple[float, float]  # oncoming gap (s) a left turner accepts, drawn per driver
    lane_change_rate: float  # lane changes per vehicle per second, where a neighbour exists
    lat_accel: float  # comfortable lateral acceleration in turns, m/s^2
    vehicle_density: float  # vehicles per metre of vehicle lane
    pedestrians: tuple[int, int]
    cyclists: tuple[int, int]
    parked_per_100m: float
    bike_lane_prob: float
    bus_lane_prob: float
    signal_prob: float  # junctions with signals; the rest are all-way stops
    cycle: tuple[float, float]  # signal green time per axis, s


STYLES = {
    "suburban": Style(
        name="suburban",
        description="wide, curved multi-lane roads, long blocks, fast and calm drivers, few pedestrians",
        block=(150.0, 210.0),
        lanes=(1, 2, 2, 3),
        lane_width=(3.5, 3.9),
        segment_length=(35.0, 60.0),
        bend=22.0,
        bend_wavelength=420.0,
        speed_limit=(16.0, 24.0),
        speed_factor=(0.85, 1.15),
        accel=1.2,
        decel=1.8,
        headway=1.6,
        turn_prob=0.5,
        gap_accept=(4.5, 6.5),
        lane_change_rate=0.025,
        lat_accel=2.0,
        vehicle_density=0.017,
        pedestrians=(4, 14),
        cyclists=(0, 3),
        parked_per_100m=0.6,
        bike_lane_prob=0.15,
        bus_lane_prob=0.0,
        signal_prob=0.6,
        cycle=(14.0, 24.0),
    ),
    "downtown": Style(
        name="downtown",
        description="dense straight grid, short blocks, narrow lanes, bike and bus lanes, slow but "
        "aggressive drivers who turn and change lanes often, many pedestrians",
        block=(95.0, 135.0),
        lanes=(1, 2, 2),
        lane_width=(2.9, 3.3),
        segment_length=(45.0, 70.0),
        bend=2.0,
        bend_wavelength=300.0,
        speed_limit=(8.0, 13.0),
        speed_factor=(0.9, 1.3),
        accel=2.2,
        decel=3.0,
        headway=1.0,
        turn_prob=0.6,
        gap_accept=(3.0, 4.5),
        lane_change_rate=0.06,
        lat_accel=3.0,
        vehicle_density=0.014,
        pedestrians=(10, 35),
        cyclists=(2, 8),
        parked_per_100m=1.5,
        bike_lane_prob=0.3,
        bus_lane_prob=0.25,
        signal_prob=0.85,
        cycle=(10.0, 18.0),
    ),
}


def get_style(name: str) -> Style:
    from forecast_peft.errors import UserError

    if name not in STYLES:
        raise UserError(f"unknown synthetic style '{name}' (styles: {', '.join(STYLES)})")
    return STYLES[name]
