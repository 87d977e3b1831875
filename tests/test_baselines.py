"""The simple predictors `fpeft eval` scores beside checkpoints."""

import math

import pytest
import torch

from forecast_peft.cli import main
from forecast_peft.constants import CURRENT_STEP, FUTURE_STEPS, HISTORY_STEPS, HZ, TOTAL_STEPS
from forecast_peft.evaluation import (
    HEADING_MIN_SPEED,
    KINEMATIC_MODES,
    MAX_TURN_RATE,
    constant_velocity,
    kinematic_modes,
)

T = FUTURE_STEPS / HZ  # 6 s


def moving(speeds, headings, recorded=None) -> dict:
    """A batch whose focal agents moved in a straight line at ``speeds`` m/s along ``headings``
    (their recorded heading: ``recorded``, by default the same)."""
    speed, heading = torch.tensor(speeds, dtype=torch.float64), torch.tensor(headings, dtype=torch.float64)
    step = torch.stack([heading.cos(), heading.sin()], -1) * (speed / HZ)[:, None]  # [B, 2] m per step
    x = step[:, None, None, :].expand(-1, 1, HISTORY_STEPS, -1).clone()  # [B, 1 actor, 50, 2]
    angles = torch.tensor(headings if recorded is None else recorded, dtype=torch.float32)
    return {"x": x, "x_angles": angles[:, None, None].expand(-1, 1, TOTAL_STEPS).clone()}


def mode(name: str) -> int:
    order = ("keep", "brake", "slow", "speed_up", "left", "right")
    return order.index(name)


def test_first_mode_is_constant_velocity_and_scores_highest():
    batch = moving([0.0, 3.0, 12.0, 25.0], [0.0, 0.4, -2.5, math.pi / 2])
    y_hat, pi = kinematic_modes(batch)
    cv, _ = constant_velocity(batch)
    assert y_hat.shape == (4, len(KINEMATIC_MODES), FUTURE_STEPS, 2) and pi.shape == (4, len(KINEMATIC_MODES))
    torch.testing.assert_close(y_hat[:, 0], cv[:, 0], rtol=1e-9, atol=1e-9)
    assert (pi.argmax(-1) == 0).all()


def test_longitudinal_modes_follow_the_equations_of_motion():
    v = 10.0
    y_hat, _ = kinematic_modes(moving([v], [0.0]))
    end = y_hat[0, :, -1]  # [K, 2] along +x
    a_brake, a_slow, a_up = (KINEMATIC_MODES[mode(m)][0] for m in ("brake", "slow", "speed_up"))
    # braking stops after v / 3 s and v^2 / 6 m, then stays
    assert end[mode("brake"), 0].item() == pytest.approx(v * v / (2 * -a_brake), abs=0.05)
    stop_step = math.ceil(v / -a_brake * HZ)
    assert torch.equal(y_hat[0, mode("brake"), stop_step], y_hat[0, mode("brake"), -1])
    assert end[mode("slow"), 0].item() == pytest.approx(v * T + a_slow * T * T / 2, rel=1e-9)
    assert end[mode("speed_up"), 0].item() == pytest.approx(v * T + a_up * T * T / 2, rel=1e-9)
    assert end[[mode("brake"), mode("slow"), mode("speed_up")], 1].abs().max() < 1e-9  # no sideways drift


@pytest.mark.parametrize("v", [4.0, 10.0, 30.0])
def test_turn_modes_drive_arcs_left_and_right(v):
    heading = 0.7
    y_hat, _ = kinematic_modes(moving([v], [heading]))
    lateral = KINEMATIC_MODES[mode("left")][1]
    rate = min(lateral / v, MAX_TURN_RATE)
    radius = v / rate
    turned = rate * T
    # the end of an arc of radius v / rate, rotated to the agent's heading
    local = torch.tensor([radius * math.sin(turned), radius * (1 - math.cos(turned))], dtype=torch.float64)
    c, s = math.cos(heading), math.sin(heading)
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    left, right = y_hat[0, mode("left"), -1], y_hat[0, mode("right"), -1]
    torch.testing.assert_close(left, rot @ local, rtol=0, atol=0.02)
    torch.testing.assert_close(right, rot @ (local * torch.tensor([1.0, -1.0], dtype=torch.float64)), rtol=0, atol=0.02)
    # every step is v / HZ long: turning does not change the speed
    steps = torch.diff(y_hat[0, mode("left")], dim=0, prepend=torch.zeros(1, 2, dtype=torch.float64))
    torch.testing.assert_close(steps.norm(dim=-1), torch.full((FUTURE_STEPS,), v / HZ, dtype=torch.float64))


def test_a_standing_agent_stays_unless_speeding_up_along_its_heading():
    heading = 1.2
    y_hat, pi = kinematic_modes(moving([0.0], [0.0], recorded=[heading]))
    assert torch.isfinite(y_hat).all() and torch.isfinite(pi).all()
    others = [k for k in range(len(KINEMATIC_MODES)) if k != mode("speed_up")]
    assert y_hat[0, others].abs().max() == 0
    distance = KINEMATIC_MODES[mode("speed_up")][0] * T * T / 2
    expected = torch.tensor([math.cos(heading), math.sin(heading)], dtype=torch.float64) * distance
    torch.testing.assert_close(y_hat[0, mode("speed_up"), -1], expected, rtol=1e-6, atol=1e-6)


def test_a_creeping_agent_follows_its_recorded_heading_not_its_jitter():
    """Below HEADING_MIN_SPEED the velocity's direction is noise: the modes other than constant
    velocity head along the recorded heading."""
    slow = 0.5 * HEADING_MIN_SPEED
    y_hat, _ = kinematic_modes(moving([slow], [2.0], recorded=[0.0]))  # drifting sideways and back
    torch.testing.assert_close(y_hat[0, 0], constant_velocity(moving([slow], [2.0]))[0][0, 0])
    end = y_hat[0, mode("speed_up"), -1]
    assert end[0] > 15 and abs(end[1]) < 1e-6  # along +x, the recorded heading


def test_uses_only_the_last_observed_steps():
    batch = moving([8.0], [0.3])
    batch["x"][:, :, : CURRENT_STEP - 10] = 123.0  # old history does not matter
    torch.testing.assert_close(kinematic_modes(batch)[0], kinematic_modes(moving([8.0], [0.3]))[0])


def test_unknown_baseline_is_one_line_before_any_work(tmp_path, capsys):
    code = main(["eval", "baselines=[constant_velocity,nope]", f"data.root={tmp_path / 'missing'}"])
    err = capsys.readouterr().err
    assert code == 1 and "unknown baseline nope" in err and "kinematic_modes" in err
    assert len(err.strip().splitlines()) == 1


def test_the_manoeuvre_of_each_focal_agent_is_read_from_its_ground_truth():
    """What the report breaks its rows down by: stationary (ends within the miss threshold), a turn
    (the heading at the end more than 45 degrees from now; + left, as angles count), or straight."""
    from forecast_peft.constants import MANOEUVRES, TURN_RAD
    from forecast_peft.evaluation import focal_manoeuvres

    ends = [(40.0, 0.0, 0.0), (30.0, 25.0, TURN_RAD + 0.05), (30.0, -25.0, -TURN_RAD - 0.05), (1.5, 0.5, 1.2)]
    ends += [(40.0, 10.0, TURN_RAD - 0.05), (0.2, -0.1, -3.0), (2.1, 0.0, 0.0)]
    batch = {"x_angles": torch.zeros(len(ends), 3, TOTAL_STEPS), "y": torch.zeros(len(ends), 3, FUTURE_STEPS, 2)}
    for i, (x, y, heading) in enumerate(ends):
        batch["x_angles"][i, 0, -1] = heading
        batch["y"][i, 0, -1] = torch.tensor([x, y])
        batch["x_angles"][i, 1, -1] = -heading  # another actor's: not read
    names = [MANOEUVRES[k] for k in focal_manoeuvres(batch).tolist()]
    assert names == ["straight", "left turn", "right turn", "stationary", "straight", "stationary", "straight"]
