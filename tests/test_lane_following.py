"""The lane-following baseline: the ways through the lanes ahead, walked at the agent's speed and
with speed changes; kinematic_modes where the agent is on no lane."""

import math

import numpy as np
import torch

from forecast_peft.constants import FUTURE_STEPS, HZ, LANE_POINTS, NUM_MODES
from forecast_peft.evaluation import BASELINES, kinematic_modes
from forecast_peft.lane_following import SPEED_CHANGES, along, lane_following, lane_ways
from tests.test_baselines import moving

T = np.arange(1, FUTURE_STEPS + 1) / HZ  # s


def line(a, b, n: int = LANE_POINTS) -> np.ndarray:
    return np.linspace(a, b, n)


def arc(centre, radius: float, start: float, stop: float, n: int = LANE_POINTS) -> np.ndarray:
    angle = np.linspace(start, stop, n)
    return np.stack([centre[0] + radius * np.cos(angle), centre[1] + radius * np.sin(angle)], -1)


def with_lanes(batch: dict, *lanes: np.ndarray, cut: dict | None = None) -> dict:
    """``batch`` (one scene) with these lanes; ``cut``: {lane: points padded at its end}."""
    m = max(1, len(lanes))
    points = torch.zeros(1, m, LANE_POINTS, 2)
    padded = torch.ones(1, m, LANE_POINTS, dtype=torch.bool)
    for i, lane in enumerate(lanes):
        keep = LANE_POINTS - (cut or {}).get(i, 0)
        points[0, i, :keep] = torch.as_tensor(lane[:keep], dtype=torch.float32)
        padded[0, i, :keep] = False
    return {**batch, "lane_positions": points, "lane_padding_mask": padded, "lane_key_padding_mask": padded.all(-1)}


# a junction 10 m ahead: the approach lane, straight on, and a left turn of 15 m radius onto a road north
APPROACH = line([-20.0, 0.0], [10.0, 0.0])
STRAIGHT = line([10.0, 0.0], [70.0, 0.0])
LEFT = arc([10.0, 15.0], 15.0, -math.pi / 2, 0.0)
NORTH = line([25.0, 15.0], [25.0, 75.0])
ONCOMING = line([70.0, 3.5], [-20.0, 3.5])  # the other way, beside the agent


def test_on_a_straight_lane_the_modes_keep_or_change_speed_along_it():
    speed = 10.0
    y_hat, pi = lane_following(with_lanes(moving([speed], [0.0]), line([-30.0, 0.0], [40.0, 0.0])))
    assert y_hat.shape == (1, NUM_MODES, FUTURE_STEPS, 2) and pi.shape == (1, NUM_MODES)
    assert int(pi[0].argmax()) == 0
    ends = y_hat[0, :4, -1].numpy()  # one way: constant speed, then each speed change (past the lane: straight on)
    want = [speed * 6.0] + [
        speed * t + 0.5 * a * t * t for a in SPEED_CHANGES for t in [min(6.0, speed / -a) if a < 0 else 6.0]
    ]
    np.testing.assert_allclose(ends[:, 0], want, atol=1e-4)
    np.testing.assert_allclose(ends[:, 1], 0.0, atol=1e-4)
    np.testing.assert_allclose(y_hat[0, 0, :, 0].numpy(), speed * T, atol=1e-4)
    kinematic, _ = kinematic_modes(moving([speed], [0.0]))
    torch.testing.assert_close(y_hat[0, 4:], kinematic[0, 4:].to(y_hat.dtype))  # the turns fill the last two


def test_at_a_junction_each_way_is_a_mode_the_straightest_first():
    speed = 5.0  # 30 m in 6 s: 10 m to the junction, 20 m into the turn
    batch = with_lanes(moving([speed], [0.0]), ONCOMING, LEFT, NORTH, APPROACH, STRAIGHT)
    y_hat, _ = lane_following(batch)
    np.testing.assert_allclose(y_hat[0, 0, -1].numpy(), [30.0, 0.0], atol=1e-3)
    angle = 20.0 / 15.0  # radians of the turn after 20 m
    left = [10.0 + 15.0 * math.sin(angle), 15.0 - 15.0 * math.cos(angle)]
    np.testing.assert_allclose(y_hat[0, 1, -1].numpy(), left, atol=0.15)  # chords of 19 segments, not the arc
    # constant speed along the arc: each step about as long as the others
    steps = torch.linalg.vector_norm(y_hat[0, 1].diff(dim=0), dim=-1)
    assert float(steps.max() - steps.min()) < 0.01
    ends = y_hat[0, :, -1].numpy()
    assert all(e[1] < 1.0 for e in ends[[0, 2, 3, 4]])  # the straight way's speed changes
    assert ends[5][1] > 5.0  # and the left turn speeding up


def test_lanes_the_other_way_far_or_missing_are_not_followed():
    for lanes in ((ONCOMING,), (line([-20.0, 6.0], [40.0, 6.0]),), ()):
        batch = with_lanes(moving([8.0], [0.0]), *lanes)
        torch.testing.assert_close(lane_following(batch)[0], kinematic_modes(batch)[0])


def test_a_lane_drawn_twice_is_one_way_and_padded_points_are_not_walked():
    points = np.stack([APPROACH, STRAIGHT, APPROACH + 0.01, line([10.0, 0.0], [40.0, 0.0])])
    valid = np.ones(points.shape[:2], dtype=bool)
    valid[3, 12:] = False  # a lane the 150 m box cut: its padded points are zeros in the batch
    points[3, 12:] = 0.0
    ways = lane_ways(points, valid, np.array([1.0, 0.0]), 50.0)
    assert len(ways) == 1 and np.allclose(ways[0][-1], [70.0, 0.0])
    cut = lane_ways(points[[0, 3]], valid[[0, 3]], np.array([1.0, 0.0]), 50.0)
    assert len(cut) == 1 and cut[0][:, 0].min() >= 0.0 and np.allclose(cut[0][-1], line([10.0, 0.0], [40.0, 0.0])[11])


def test_along_walks_a_polyline_then_goes_straight_on():
    way = np.array([[0.0, 0.0], [3.0, 0.0], [3.0, 4.0]])
    got = along(way, np.array([0.0, 1.5, 5.0, 9.0]))
    np.testing.assert_allclose(got, [[0.0, 0.0], [1.5, 0.0], [3.0, 2.0], [3.0, 6.0]])


def test_eval_scores_it_by_default():
    from forecast_peft import config

    assert "lane_following" in BASELINES and "lane_following" in config.compose("eval", []).baselines


def test_past_the_end_of_a_way_whose_last_points_coincide_it_goes_on_along_its_last_direction():
    way = np.array([[0.0, 0.0], [0.0, 2.0], [0.0, 2.0]])
    np.testing.assert_allclose(along(way, np.array([3.0])), [[0.0, 3.0]])
