import shutil

import numpy as np
import pandas as pd
import pytest
from av2.datasets.motion_forecasting.data_schema import TrackCategory
from av2.datasets.motion_forecasting.scenario_serialization import load_argoverse_scenario_parquet
from av2.map.map_api import ArgoverseStaticMap

from forecast_peft.data.synth.generate import generate
from forecast_peft.data.synth.stats import collect, summarize
from forecast_peft.data.synth.styles import STYLES
from forecast_peft.data.synth.writer import CITIES
from tests.conftest import full_disk_at


def test_files_read_with_av2_and_match_the_real_format(synth_root, sample_dir):
    real = pd.read_parquet(next(sample_dir.glob("*.parquet")))
    dirs = sorted(p for p in (synth_root / "train").iterdir() if p.is_dir())
    ids = set()
    categories, types = set(), set()
    for d in dirs:
        sid = d.name
        ids.add(sid)
        parquet = d / f"scenario_{sid}.parquet"
        df = pd.read_parquet(parquet)
        assert df.dtypes.to_dict() == real.dtypes.to_dict()
        assert sorted(df.timestep.unique()) == list(range(110))
        assert df.loc[df.timestep >= 50, "observed"].eq(False).all() and df.loc[df.timestep < 50, "observed"].all()
        focal = df.focal_track_id.iloc[0]
        assert (df.track_id == focal).sum() == 110 and (df.track_id == "AV").sum() == 110
        scenario = load_argoverse_scenario_parquet(parquet)
        assert scenario.scenario_id == sid
        categories |= {t.category for t in scenario.tracks}
        types |= {t.object_type.value for t in scenario.tracks}
        static_map = ArgoverseStaticMap.from_json(d / f"log_map_archive_{sid}.json")
        lanes = list(static_map.vector_lane_segments.values())
        assert lanes and static_map.vector_pedestrian_crossings and static_map.vector_drivable_areas
    assert len(ids) == len(dirs)
    assert categories == set(TrackCategory)
    assert {"vehicle", "pedestrian"} <= types


def test_map_structure(synth_root):
    d = sorted(p for p in (synth_root / "train").iterdir() if p.is_dir())[0]
    m = ArgoverseStaticMap.from_json(next(d.glob("*.json")))
    lanes = list(m.vector_lane_segments.values())
    assert any(lane.is_intersection for lane in lanes)
    assert any(len(lane.successors) >= 3 for lane in lanes)  # left / straight / right at a junction
    assert any(lane.left_neighbor_id is not None for lane in lanes)
    assert {lane.lane_type.value for lane in lanes} >= {"VEHICLE"}
    marks = {lane.left_mark_type.value for lane in lanes} | {lane.right_mark_type.value for lane in lanes}
    assert {"DASHED_WHITE", "SOLID_WHITE", "DOUBLE_SOLID_YELLOW"} <= marks


def test_deterministic_for_a_seed(tmp_path):
    a = generate(tmp_path / "a", "val", 3, seed=11, style="suburban", progress=False)
    b = generate(tmp_path / "b", "val", 3, seed=11, style="suburban", progress=False)
    for pa, pb in zip(a, b):
        da = pd.read_parquet(next((tmp_path / "a" / "val" / pa.split("/")[-1]).glob("*.parquet")))
        db = pd.read_parquet(next((tmp_path / "b" / "val" / pb.split("/")[-1]).glob("*.parquet")))
        pd.testing.assert_frame_equal(da, db)
    c = generate(tmp_path / "c", "val", 3, seed=12, style="suburban", progress=False)
    assert {p.split("/")[-1] for p in a}.isdisjoint({p.split("/")[-1] for p in c})


def test_rerun_skips_written_scenarios(tmp_path):
    first = generate(tmp_path, "train", 2, seed=1, style="downtown", progress=False)
    mtimes = [next((tmp_path / "train" / p.split("/")[-1]).glob("*.parquet")).stat().st_mtime_ns for p in first]
    again = generate(tmp_path, "train", 3, seed=1, style="downtown", progress=False)
    assert again[:2] == first
    assert mtimes == [next((tmp_path / "train" / p.split("/")[-1]).glob("*.parquet")).stat().st_mtime_ns for p in first]


def test_a_full_disk_stops_synth_in_one_line_and_the_same_command_goes_on(tmp_path, monkeypatch):
    """pyarrow's full-disk error (no errno) on the third scenario: a one-line error naming it and
    no half-written folder; run again, the two written are kept and the rest added."""
    from forecast_peft.data import av2_format
    from forecast_peft.errors import UserError

    _, real = full_disk_at(monkeypatch, 3)
    with pytest.raises(
        UserError, match=r"cannot write the scenario .* \(Error writing bytes to file\. Detail: \[errno 28\]"
    ):
        generate(tmp_path, "train", 4, seed=1, style="suburban", progress=False)
    assert len([p for p in (tmp_path / "train").iterdir()]) == 2  # no .tmp- folder left beside them
    monkeypatch.setattr(av2_format.pq, "write_table", real)
    assert len(generate(tmp_path, "train", 4, seed=1, style="suburban", progress=False)) == 4
    assert len([p for p in (tmp_path / "train").iterdir()]) == 4


def test_styles_differ():
    sub, down = STYLES["suburban"], STYLES["downtown"]
    assert sub.block[0] > down.block[1] and sub.speed_limit[0] > down.speed_limit[1]
    assert sub.lane_width[0] > down.lane_width[1] and down.turn_prob > sub.turn_prob


@pytest.mark.parametrize("style", sorted(STYLES))
def test_scenes_look_like_av2(style, tmp_path):
    generate(tmp_path, "train", 40, seed=5, style=style, progress=False)
    table = collect(tmp_path / "train")
    s = summarize(table)
    assert 10 <= s["actors_150m"]["50%"] <= 80
    assert 40 <= s["lanes_box"]["50%"] <= 250
    assert table.focal_speed.min() < 0.5 and table.focal_speed.max() > 8.0
    assert s["turn_or_lane_change_share"] >= 0.25
    assert s["cv_miss_share"] >= 0.30
    assert set(s["cities"]) <= set(CITIES) and sum(s["cities"].values()) == 40


def test_speeds_reach_highway_range(tmp_path):
    generate(tmp_path, "train", 30, seed=9, style="suburban", progress=False)
    table = collect(tmp_path / "train")
    assert table.focal_speed.max() > 14.0
    assert np.isfinite(table.cv_fde).all()


def test_left_turners_give_way_to_oncoming_traffic():
    """At signals a left turner waits for a gap: whoever it gave way to comes from the opposite
    direction, and the turner slows down after giving way."""
    from forecast_peft.constants import TOTAL_STEPS
    from forecast_peft.data.synth.generate import scenario_rng
    from forecast_peft.data.synth.roadnet import build_roadnet
    from forecast_peft.data.synth.sim import lane_geometry, simulate
    from forecast_peft.data.synth.styles import get_style

    style = get_style("downtown")
    cosines, slowed = [], []
    for index in range(12):
        rng = scenario_rng(5, "val", style.name, index)
        net = build_roadnet(rng, style)
        tracks = simulate(net, lane_geometry(net, style.lat_accel), style, rng, TOTAL_STEPS)
        for i in np.flatnonzero(tracks.yield_to[:, 0] >= 0):
            other, t = tracks.yield_to[i]
            assert tracks.on_lane[other] and tracks.active[other, t]
            cosines.append(np.cos(tracks.heading[i, t] - tracks.heading[other, t]))
            if t < TOTAL_STEPS - 30:
                v = tracks.speed[i, t]
                slowed.append(tracks.speed[i, t : t + 30].min() < max(0.8 * v, 1.0))
    assert len(cosines) >= 10
    assert max(cosines) < -0.5  # oncoming, never crossing or same-direction traffic
    assert np.mean(slowed) > 0.75


def test_all_way_stops_let_one_axis_in_at_a_time():
    """At junctions without signals, vehicles from crossing roads are almost never inside the
    junction together (without the give-way rule it was about a quarter of the busy steps)."""
    from forecast_peft.constants import TOTAL_STEPS
    from forecast_peft.data.synth.generate import scenario_rng
    from forecast_peft.data.synth.roadnet import build_roadnet
    from forecast_peft.data.synth.sim import CLEAR_FRACTION, _approach_directions, lane_geometry, simulate
    from forecast_peft.data.synth.styles import get_style

    style = get_style("downtown")
    busy = both = 0
    for index in range(10):
        rng = scenario_rng(5, "val", style.name, index)
        net = build_roadnet(rng, style)
        geo = lane_geometry(net, style.lat_accel)
        tracks = simulate(net, geo, style, rng, TOTAL_STEPS)
        dir_of, junction = _approach_directions(net)
        all_way = np.array([not j.signal for j in net.junctions] + [False])
        lane = tracks.lane
        inside = (lane >= 0) & tracks.active
        inside &= all_way[junction[lane]] & (junction[lane] >= 0)
        inside &= tracks.arc < CLEAR_FRACTION * geo.length[lane]
        for t in range(TOTAL_STEPS):
            agents = np.flatnonzero(inside[:, t])
            for j in np.unique(junction[lane[agents, t]]):
                axes = {int(dir_of[lane[k, t]] >> 1) for k in agents if junction[lane[k, t]] == j}
                busy += 1
                both += len(axes) > 1
    assert busy > 200
    assert both / busy < 0.02


def test_stats_skip_what_they_cannot_read(sample_dir, tmp_path, capsys):
    from forecast_peft.cli import main

    split = tmp_path / "val"
    shutil.copytree(sample_dir, split / "good")
    (split / "broken").mkdir()
    (split / "broken" / "scenario_broken.parquet").write_bytes(b"not parquet")
    assert main(["synth", "--stats", str(split)]) == 0
    captured = capsys.readouterr()
    assert f"skipped {split / 'broken'}: missing map file" in captured.err
    assert f"{split}: 1 scenario\n" in captured.out
    assert main(["synth", "--stats", str(tmp_path)]) == 1  # a data root, not a split
    assert f"{tmp_path} is a data root: give one of its splits, such as {split}" in capsys.readouterr().err
