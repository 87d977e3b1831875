"""`fpeft convert`: driving logs of one's own (tracks and a lane map) cut into AV2 scenarios."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from forecast_peft.cli import main
from forecast_peft.constants import FOCAL_TRACK, HISTORY_STEPS, LANE_TYPE_INDEX, TOTAL_STEPS
from forecast_peft.data.av2_reader import extract
from forecast_peft.data.convert import (
    FOCAL_SCORES,
    build_logs,
    convert,
    cut_window,
    focal_agents,
    read_tracks,
    resample,
)
from tests.conftest import TINY, full_disk_at


def _sample_tracks(sample_dir) -> pd.DataFrame:
    """The real AV2 sample's tracks as a user's table: seconds, no ids of AV2's own."""
    df = pq.read_table(next(sample_dir.glob("scenario_*.parquet"))).to_pandas()
    return pd.DataFrame(
        {
            "track_id": df.track_id,
            "time_s": df.timestep * 0.1,
            "x": df.position_x,
            "y": df.position_y,
            "heading": df.heading,
            "vx": df.velocity_x,
            "vy": df.velocity_y,
            "object_type": df.object_type,
        }
    ), str(df.focal_track_id.iloc[0])


def _scenarios(split_dir) -> dict[str, pd.DataFrame]:
    """The scenario tables written to a split, by focal track."""
    tables = [pq.read_table(next(d.glob("scenario_*.parquet"))).to_pandas() for d in sorted(split_dir.iterdir())]
    return {t.focal_track_id.iloc[0]: t for t in tables}


def test_a_scenario_cut_from_tracks_has_the_features_of_the_av2_original(sample_dir, tmp_path, capsys):
    tracks, focal = _sample_tracks(sample_dir)
    tracks.to_csv(tmp_path / "drive.csv", index=False)
    map_file = next(sample_dir.glob("log_map_archive_*.json"))
    counts = convert([tmp_path / "drive.csv"], map_file, tmp_path / "data", "val", "austin", focal_per_window=50)
    written = _scenarios(tmp_path / "data" / "val")
    # one window of 110 steps; a scenario for each mover seen at all of them
    movers = {"vehicle", "pedestrian", "motorcyclist", "cyclist", "bus"}
    full = tracks[tracks.object_type.isin(movers)].groupby("track_id").size()
    assert counts["windows"] == 1 and counts["written"] == len(written) == (full == TOTAL_STEPS).sum() > 1
    assert focal in written
    table = written[focal]
    assert (table.object_category[table.track_id == focal] == FOCAL_TRACK).all()
    assert table.city.iloc[0] == "austin" and table.slice_id.iloc[0] == "drive"
    assert len(table) == len(tracks)  # every row of the window, none lost
    ours, av2 = extract(tmp_path / "data" / "val" / table.scenario_id.iloc[0]), extract(sample_dir)
    for key, value in av2.items():
        if key == "scenario_id":
            continue
        if key == "x_attr":  # the category column is AV2's own judgement; type and combined type are read
            np.testing.assert_array_equal(ours[key][:, [0, 2]], value[:, [0, 2]])
        elif isinstance(value, np.ndarray):
            np.testing.assert_allclose(ours[key], value, atol=1e-5, err_msg=key)
        else:
            assert ours[key] == value, key
    # the drive and its archive 1 km east and 2 km north, taken back by convert.origin
    far = tracks.assign(x=tracks.x + 1000.0, y=tracks.y + 2000.0)
    far.to_csv(tmp_path / "far.csv", index=False)
    archive = json.loads(map_file.read_text())
    for lane in archive["lane_segments"].values():
        for key in ("centerline", "left_lane_boundary", "right_lane_boundary"):
            lane[key] = [{**p, "x": p["x"] + 1000.0, "y": p["y"] + 2000.0} for p in lane[key]]
    (tmp_path / "far.json").write_text(json.dumps(archive))
    convert(
        [tmp_path / "far.csv"],
        tmp_path / "far.json",
        tmp_path / "far",
        "val",
        "austin",
        focal_per_window=50,
        origin=[1000.0, 2000.0],
        progress=False,
    )
    shifted = _scenarios(tmp_path / "far" / "val")[focal]
    back = extract(tmp_path / "far" / "val" / shifted.scenario_id.iloc[0])
    for key in ("x", "y", "lane_positions", "lane_attr", "x_centers"):
        np.testing.assert_allclose(back[key], ours[key], atol=1e-3, err_msg=key)
    # the scenario of the mover that travels farthest, by default, and a re-run writes nothing new
    shutil.rmtree(tmp_path / "data")
    assert convert([tmp_path / "drive.csv"], map_file, tmp_path / "data", "val")["written"] == 1
    again = convert([tmp_path / "drive.csv"], map_file, tmp_path / "data", "val")
    assert again["written"] == 0 and again["present"] == 1
    # the test split holds the history alone: the reader takes it as a test scenario
    assert (
        main(
            [
                "convert",
                str(tmp_path / "data"),
                "-t",
                str(tmp_path / "drive.csv"),
                "--map",
                str(map_file),
                "--split",
                "test",
                "convert.stride_s=3",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "1 log, 3 windows of 5 s: wrote 3 scenarios" in captured.out
    # the same log in two splits: said (the val split's scenarios were written by the calls above)
    assert (
        "convert test: 1 log of this split is in the val split too, over the same time (drive): their scenarios "
        "overlap in time and scene" in captured.err
    )
    logs = json.loads((tmp_path / "data" / ".convert_logs.json").read_text())
    assert logs == {"val": {"drive": [[0, 109]]}, "test": {"drive": [[0, 109]]}}  # the steps each split covers
    for table in _scenarios(tmp_path / "data" / "test").values():
        assert table.timestep.max() == HISTORY_STEPS - 1 and (table.num_timestamps == HISTORY_STEPS).all()
    scene = extract(next((tmp_path / "data" / "test").iterdir()), split="test")
    assert scene["y"] is None
    assert main(["preprocess", f"data.root={tmp_path / 'data'}"]) == 0
    assert "test: 3 scenarios, read 3, written 3" in capsys.readouterr().out


def test_tracks_are_resampled_to_10_hz_with_short_gaps_bridged_and_motion_derived(tmp_path):
    # samples every 0.05 s with a few milliseconds of jitter, over 12 s
    rng = np.random.default_rng(0)
    times = np.arange(0, 12.0, 0.05) + rng.uniform(-0.004, 0.004, 240)
    times[0] = 0.0
    start = np.array([10.0, -3.0])
    velocity = np.array([6.0, 8.0])  # 10 m/s, heading atan2(8, 6)
    position = start + times[:, None] * velocity
    first, seen, grid = resample(times, {"position": position}, max_gap_s=0.5)
    steps = np.arange(first, first + len(seen))
    np.testing.assert_allclose(grid["position"], start + steps[:, None] / 10 * velocity, atol=1e-9)
    assert first == 0 and seen.all() and len(seen) == 120  # up to 11.9 s, the last grid step sampled around
    # gaps: 0.3 s bridged, 1.0 s not
    keep = (times < 3.0) | (times > 3.3)
    keep &= (times < 6.0) | (times > 7.0)
    _, seen, _ = resample(times[keep], {"position": position[keep]}, max_gap_s=0.5)
    assert seen[28:35].all() and not seen[61:70].any() and seen[:60].all() and seen[71:].all()
    # nanoseconds written with a fraction (a float column) are rounded to whole ones
    pd.DataFrame({"track_id": 1, "timestamp_ns": [0.4, 1e8 + 0.6], "x": 0.0, "y": 0.0}).to_csv(tmp_path / "ns.csv")
    assert read_tracks(tmp_path / "ns.csv")[0].timestamp_ns.tolist() == [0, 100_000_001]
    # 2 Hz (nuScenes' annotations): every 0.5 s, bridged at the default max_gap_s
    slow = np.arange(0, 12.0, 0.5)
    first, seen, grid = resample(slow, {"position": start + slow[:, None] * velocity}, max_gap_s=0.5)
    assert first == 0 and seen.all() and len(seen) == 116
    np.testing.assert_allclose(grid["position"], start + np.arange(116)[:, None] / 10 * velocity, atol=1e-9)
    rows = pd.DataFrame(
        {
            "track_id": 7,
            "timestamp_ns": (1_700_000_000 * 10**9 + times * 1e9).astype(np.int64),
            "x": position[:, 0],
            "y": position[:, 1],
        }
    )
    # a second track that stands still: no direction of motion, heading 0
    still = pd.DataFrame({"track_id": 8, "timestamp_ns": rows.timestamp_ns, "x": 40.0, "y": 0.0})
    pd.concat([rows, still]).to_parquet(tmp_path / "run.parquet")
    lanes = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "geometry": {"type": "LineString", "coordinates": [[0, -20], [30, 20], [300, 380]]},
                "properties": {"width": 3.0},
            }
        ],
    }
    (tmp_path / "lanes.geojson").write_text(json.dumps(lanes))
    counts = convert([tmp_path / "run.parquet"], tmp_path / "lanes.geojson", tmp_path / "out", focal_per_window=2)
    assert counts["written"] == 2 and counts["windows"] == 1
    table = _scenarios(tmp_path / "out" / "train")["7"]
    own = table[table.track_id == "7"].sort_values("timestep")
    assert len(own) == TOTAL_STEPS and table.object_type.eq("vehicle").all()
    np.testing.assert_allclose(own[["velocity_x", "velocity_y"]].to_numpy(), np.tile(velocity, (110, 1)), atol=1e-4)
    np.testing.assert_allclose(own.heading, np.arctan2(8, 6), atol=1e-5)
    np.testing.assert_allclose(table.start_timestamp.iloc[0], 1_700_000_000 * 1e9)
    other = table[table.track_id == "8"]
    assert (other.heading == 0).all() and (other[["velocity_x", "velocity_y"]].to_numpy() == 0).all()
    assert (other.object_category == 1).all()  # seen throughout but not moving: unscored
    # focal agents of chosen types only: the pedestrian who stands still, not the vehicle
    table = pd.read_parquet(tmp_path / "run.parquet")
    table["object_type"] = np.where(table.track_id == 8, "pedestrian", "vehicle")
    table["city"] = "zurich"  # a city column wins over the setting
    table.to_parquet(tmp_path / "walk.parquet")
    counts = convert(
        [tmp_path / "walk.parquet"],
        tmp_path / "lanes.geojson",
        tmp_path / "walk",
        focal_per_window=2,
        focal_types=["pedestrian"],
        progress=False,
    )
    walk = _scenarios(tmp_path / "walk" / "train")
    assert counts["written"] == 1 and list(walk) == ["8"] and (walk["8"].city == "zurich").all()


def _drive(track_id: str, t: np.ndarray, speed: np.ndarray, start, turn_at_m: float | None = None) -> pd.DataFrame:
    """A vehicle heading east from ``start`` at ``speed`` [T] m/s; after ``turn_at_m`` metres it
    turns left onto a quarter circle of 15 m radius and goes on north."""
    s = np.concatenate([[0.0], np.cumsum(speed[1:] * np.diff(t))])
    x, y, heading = s.copy(), np.zeros_like(s), np.zeros_like(s)
    if turn_at_m is not None:
        radius, arc = 15.0, 15.0 * np.pi / 2
        on_arc = np.clip(s - turn_at_m, 0.0, arc) / radius
        after = np.maximum(s - turn_at_m - arc, 0.0)
        x = np.minimum(s, turn_at_m) + radius * np.sin(on_arc)
        y = radius * (1 - np.cos(on_arc)) + after
        heading = on_arc
    return pd.DataFrame(
        {
            "track_id": track_id,
            "time_s": t,
            "x": start[0] + x,
            "y": start[1] + y,
            "heading": heading,
            "object_type": "vehicle",
        }
    )


def test_focal_agents_are_picked_by_travel_turn_speed_change_or_interaction(tmp_path, capsys):
    t = np.arange(TOTAL_STEPS) / 10
    brake = np.clip(10 - 2.5 * (t - 3), 0, 10)  # 10 m/s, braking from 3 s to a stop at 7 s
    rng = np.random.default_rng(0)
    tracks = [
        _drive("far", t, np.full_like(t, 12.0), (0, 0)),  # 131 m straight: the farthest
        _drive("turner", t, np.full_like(t, 6.0), (0, 100), turn_at_m=18.0),  # a left turn, 65 m
        _drive("braker", t, brake, (0, 200)),  # 50 m, then stands
        # two cars side by side, 2.5 m apart, at 5 m/s: the closest moving pair
        _drive("left", t, np.full_like(t, 5.0), (0, -100)),
        _drive("right", t, np.full_like(t, 5.0), (0, -102.5)),
        # two parked cars 1 m apart, closer than any pair, one with a heading that jitters
        _drive("parked", t, np.zeros_like(t), (0, 300)).assign(heading=rng.uniform(-np.pi, np.pi, len(t))),
        _drive("parked2", t, np.zeros_like(t), (0, 301)),
        # a cyclist seen for 1.5 s 0.4 m beside the farthest car: the tracker's noise, not a partner
        _drive("ghost", t, np.full_like(t, 12.0), (0, 0.4)).assign(object_type="cyclist").iloc[40:55],
    ]
    pd.concat(tracks).to_csv(tmp_path / "drive.csv", index=False)
    lanes = _feature({"type": "LineString", "coordinates": [[0, 0], [200, 0]]})
    (tmp_path / "lanes.geojson").write_text(json.dumps(lanes))
    picked = {}
    for by in ("travel", "turn", "speed_change", "interaction"):
        out = tmp_path / by
        run = ["convert", str(out), "-t", str(tmp_path / "drive.csv"), "--map", str(tmp_path / "lanes.geojson")]
        assert main(run + ["convert.focal_per_window=2", f"convert.focal_by={by}"]) == 0
        picked[by] = [t.focal_track_id.iloc[0] for t in _scenarios(out / "train").values()]
    assert sorted(picked["travel"]) == ["far", "turner"]
    # the turn first; the rest swing 0 while they move (the parked car's heading does not count), so
    # the farthest travelled of them comes second
    assert sorted(picked["turn"]) == ["far", "turner"]
    assert sorted(picked["speed_change"]) == ["braker", "turner"]  # 10 m/s; the turner's slows on its arc
    assert sorted(picked["interaction"]) == ["left", "right"]  # the parked pair does not move
    capsys.readouterr()
    frame, _ = read_tracks(tmp_path / "drive.csv")
    (log,) = build_logs(frame, tmp_path / "drive.csv", 0.5, "unknown", np.zeros(2))
    window = cut_window(log, 0, TOTAL_STEPS)
    ids = {by: [window.track_ids[i] for i in focal_agents(window, 7, by=by)] for by in FOCAL_SCORES}
    assert ids["travel"] == ["far", "turner", "left", "right", "braker", "parked", "parked2"]
    assert ids["turn"][0] == "turner" and ids["speed_change"][0] == "braker"
    assert ids["interaction"][:2] == ["left", "right"]  # not "far", whose ghost is seen for 15 steps
    # never moving while another mover moves: last, by how far they travel
    assert ids["interaction"][-2:] == ["parked", "parked2"]


def test_the_av2_sample_s_focal_agent_is_the_one_whose_speed_changes_most(sample_dir, tmp_path):
    """The README's example: AV2 mined the sample's focal agent, which brakes to a stop;
    ``speed_change`` ranks it first of the movers seen throughout, ``travel`` third."""
    tracks, focal = _sample_tracks(sample_dir)
    tracks.to_csv(tmp_path / "drive.csv", index=False)
    frame, _ = read_tracks(tmp_path / "drive.csv")
    (log,) = build_logs(frame, tmp_path / "drive.csv", 0.5, "austin", np.zeros(2))
    window = cut_window(log, 0, TOTAL_STEPS)
    ranked = {by: [window.track_ids[i] for i in focal_agents(window, 10, by=by)] for by in FOCAL_SCORES}
    assert len(ranked["travel"]) == 7 and ranked["travel"][2] == focal and ranked["speed_change"][0] == focal
    speed = np.linalg.norm(window.velocity[window.track_ids.index(focal)], axis=-1)
    assert speed[0] > 10 and speed[-1] < 0.1


def test_the_turn_score_unwraps_the_heading_over_the_moving_steps_alone():
    """Headings that wander across +-pi, and stops in between: the swing of the moving steps'
    headings unwrapped on their own, as a loop over the agents computes it."""
    from types import SimpleNamespace

    from forecast_peft.data.convert import _turn

    rng = np.random.default_rng(3)
    n, steps = 40, TOTAL_STEPS
    heading = np.angle(np.exp(1j * np.cumsum(rng.normal(0, 0.4, (n, steps)), axis=1)))  # wrapped to [-pi, pi]
    speed = np.where(rng.random((n, steps)) < 0.3, 0.1, 5.0)  # stopped at about a third of the steps
    speed[0] = 0.1  # never moves
    speed[1, :] = 0.1
    speed[1, 7] = 5.0  # moves at one step only
    velocity = speed[..., None] * np.stack([np.cos(heading), np.sin(heading)], -1)
    window = SimpleNamespace(heading=heading, velocity=velocity)
    expected = []
    for h, v in zip(heading, speed, strict=True):
        moving = np.unwrap(h[v >= 0.5])
        expected.append(moving.max() - moving.min() if len(moving) >= 2 else 0.0)
    got = _turn(window, np.arange(n))
    np.testing.assert_allclose(got, expected, atol=1e-9)
    assert got[0] == got[1] == 0 and got.max() > 2 * np.pi  # some wind round more than once


def test_a_geojson_lane_map_becomes_av2_lanes_near_each_focal_agent(tmp_path, capsys):
    lanes = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "id": 5,
                "geometry": {"type": "LineString", "coordinates": [[-200, 0, 1.5], [100, 0, 1.5]]},
                "properties": {"width": 4.0, "lane_type": "bike", "is_intersection": True, "successors": [6]},
            },
            {
                "type": "Feature",
                "geometry": {"type": "LineString", "coordinates": [[100, 0], [400, 0]]},
                "properties": {"id": 6, "predecessors": [5]},
            },
            {
                "type": "Feature",
                "geometry": {"type": "LineString", "coordinates": [[5000, 0], [5100, 0]]},
                "properties": {"id": 7},
            },
        ],
    }
    (tmp_path / "lanes.geojson").write_text(json.dumps(lanes))
    t = np.arange(TOTAL_STEPS) / 10
    pd.DataFrame({"track_id": "a", "time_s": t, "x": -50 + 5 * t, "y": 0.5, "object_type": "cyclist"}).to_csv(
        tmp_path / "ride.2026-12-06.csv.gz", index=False
    )
    assert (
        main(
            [
                "convert",
                str(tmp_path / "d"),
                "-t",
                str(tmp_path / "ride.2026-12-06.csv.gz"),
                "--map",
                str(tmp_path / "lanes.geojson"),
                "--city",
                "lausanne",
            ]
        )
        == 0
    )
    (scenario,) = (tmp_path / "d" / "train").iterdir()
    archive = json.loads(next(scenario.glob("log_map_archive_*.json")).read_text())
    assert sorted(archive["lane_segments"]) == ["5", "6"]  # the lane 5 km away is left out
    lane = archive["lane_segments"]["5"]
    assert lane["successors"] == [6] and lane["lane_type"] == "BIKE" and lane["is_intersection"] is True
    assert [p["y"] for p in lane["left_lane_boundary"]] == [2.0, 2.0] and lane["right_lane_boundary"][0]["z"] == 1.5
    assert archive["lane_segments"]["6"]["lane_type"] == "VEHICLE"
    features = extract(scenario)
    assert features["city"] == "lausanne"
    table = pq.read_table(next(scenario.glob("scenario_*.parquet"))).to_pandas()
    assert (table.slice_id == "ride.2026-12-06").all()  # the log: the file's name, a compressed CSV's too
    widths = features["lane_attr"][:, 1]
    np.testing.assert_allclose(sorted(widths), [3.5, 4.0], atol=1e-5)  # lane 6 has the default width
    assert LANE_TYPE_INDEX["BIKE"] in features["lane_attr"][:, 0]
    # the focal agent rides 0.5 m off lane 5's centreline: no note about frames
    assert "share a frame" not in capsys.readouterr().err


def test_a_map_in_another_frame_is_noticed_and_large_coordinates_need_an_origin(tmp_path, capsys):
    t = np.arange(TOTAL_STEPS) / 10
    east, north = 500_000.0, 4_612_000.0  # UTM-like
    pd.DataFrame({"track_id": 1, "time_s": t, "x": east + 10 * t, "y": north}).to_csv(tmp_path / "a.csv", index=False)
    lanes = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "geometry": {"type": "LineString", "coordinates": [[east - 300, north], [east + 300, north]]},
            }
        ],
    }
    (tmp_path / "utm.geojson").write_text(json.dumps(lanes))
    args = ["convert", str(tmp_path / "d"), "-t", str(tmp_path / "a.csv"), "--map", str(tmp_path / "utm.geojson")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"fpeft: error: {tmp_path / 'a.csv'}: positions reach 4,612,000 m from the origin")
    assert "convert.origin=[500000,4612000]" in err and len(err.strip().splitlines()) == 1
    assert main(args + ["convert.origin=[500000,4612000]"]) == 0
    (scenario,) = (tmp_path / "d" / "train").iterdir()
    features = extract(scenario)
    assert np.allclose(features["origin"], [[49, 0]])
    assert len(features["lane_positions"]) == 1 and "share a frame" not in capsys.readouterr().err
    # a map in another frame than the tracks' (here 100 m north): the focal agent far from every lane
    lanes["features"][0]["geometry"]["coordinates"] = [[east - 300, north + 100], [east + 300, north + 100]]
    (tmp_path / "north.geojson").write_text(json.dumps(lanes))
    assert (
        main(
            [
                "convert",
                str(tmp_path / "e"),
                "-t",
                str(tmp_path / "a.csv"),
                "--map",
                str(tmp_path / "north.geojson"),
                "convert.origin=[500000,4612000]",
            ]
        )
        == 0
    )
    assert "in 1 of the 1 scenario written the focal agent is more than 5 m from every lane" in capsys.readouterr().err


def test_rows_that_cannot_be_read_are_left_out_and_said(tmp_path, capsys):
    t = np.arange(120) / 10
    frame = pd.DataFrame({"track_id": "007", "time_s": t, "x": 2.0 * t, "y": 0.0}).astype({"x": object})
    frame.loc[115, "x"] = "n/a"
    lanes = {
        "type": "FeatureCollection",
        "features": [{"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[-100, 0], [100, 0]]}}],
    }
    (tmp_path / "m.json").write_text(json.dumps(lanes))
    with_type = frame.assign(object_type="cyclist")
    with_type.loc[116, "object_type"] = ""  # an empty object type is not taken for any
    for name, table, said in (
        ("a.csv", frame, "1 row with an empty or non-numeric time_s/x/y or an empty track_id"),
        ("b.csv", with_type, "2 rows with an empty or non-numeric time_s/x/y or an empty track_id/object_type"),
    ):
        table.to_csv(tmp_path / name, index=False)
        args = ["convert", str(tmp_path / name[0]), "-t", str(tmp_path / name), "--map", str(tmp_path / "m.json")]
        assert main(args) == 0
        captured = capsys.readouterr()
        assert f"{tmp_path / name}: left out {said} (the first: line 117)" in captured.err
        assert "wrote 1 scenario" in captured.out
        (scenario,) = (tmp_path / name[0] / "train").iterdir()  # the id as written, not 7 or 7.0
        assert pq.read_table(next(scenario.glob("*.parquet"))).column("focal_track_id")[0].as_py() == "007"


GOOD_MAP = {
    "type": "FeatureCollection",
    "features": [{"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[-100, 0], [100, 0]]}}],
}


def _feature(geometry: dict, **properties) -> dict:
    return {
        "type": "FeatureCollection",
        "features": [{"type": "Feature", "geometry": geometry, "properties": properties}],
    }


LINE = {"type": "LineString", "coordinates": [[0, 0], [10, 0]]}


@pytest.mark.parametrize(
    ("tracks", "map_data", "message"),
    [
        (
            {"track_id": [1], "t": [0.0], "x": [0.0], "y": [0.0]},
            GOOD_MAP,
            "tracks.csv: no time_s (or timestamp_ns) column; a tracks file has track_id, time_s or timestamp_ns, "
            "x and y (optional: log_id, object_type, heading, vx, vy, city); its columns: track_id, t, x, y",
        ),
        (
            {"track_id": [1, 2], "time_s": [0.0, 0.0], "x": [0.0, 1], "y": [0.0, 1], "object_type": ["car", "Vehicle"]},
            GOOD_MAP,
            "tracks.csv: unknown object_type 'car': AV2's types are vehicle, pedestrian",
        ),
        (
            {"track_id": [1, 1], "time_s": [0.5, 0.5], "x": [0.0, 1], "y": [0.0, 1]},
            GOOD_MAP,
            "tracks.csv: track 1 of log tracks has two rows at time_s 0.5",
        ),
        (
            {"track_id": [1], "time_s": [0.0], "x": [0.0], "y": [0.0], "vx": [1.0]},
            GOOD_MAP,
            "tracks.csv: velocity needs both vx and vy columns, or neither",
        ),
        (
            {"track_id": [1, 1], "time_s": [0.0, 3.0], "x": [0.0, 1], "y": [0.0, 1]},
            GOOD_MAP,
            "no log is 11 s long, which a train scenario needs (110 steps at 10 Hz); the longest: 3.1 s",
        ),
        (
            {"track_id": [1], "time_s": [0.0], "x": [0.0], "y": [0.0]},
            {"type": "Feature"},
            "map.json: neither a GeoJSON FeatureCollection of lane centrelines nor an AV2 map archive (lane_segments)",
        ),
        (
            {"track_id": [1], "time_s": [0.0], "x": [0.0], "y": [0.0]},
            _feature({"type": "Point", "coordinates": [0, 0]}),
            "map.json: feature 0 is a Point: every feature of a lane map is a LineString lane centreline",
        ),
        (
            {"track_id": [1], "time_s": [0.0], "x": [0.0], "y": [0.0]},
            {"type": "FeatureCollection", "features": []},
            "map.json: the map has no lanes, and the network reads the lanes around each scene",
        ),
        (
            {"track_id": [1], "time_s": [0.0], "x": [0.0], "y": [0.0]},
            {"type": "FeatureCollection", "features": ["lane"]},
            "map.json: feature 0 is a feature without geometry: every feature of a lane map is a LineString",
        ),
        (
            {"track_id": [1], "time_s": [0.0], "x": [0.0], "y": [0.0]},
            _feature({"type": "LineString", "coordinates": [[0, 0]]}),
            "map.json: feature 0: a lane centreline needs 2 or more [x, y] or [x, y, z] points",
        ),
        (
            {"track_id": [1], "time_s": [0.0], "x": [0.0], "y": [0.0]},
            _feature({"type": "LineString", "coordinates": [[6.566, 46.519], [6.567, 46.52]]}),
            "map.json: every lane lies within 1 unit of the others, as longitude/latitude degrees (GeoJSON's default) "
            "would: give the lanes in metres",
        ),
        (
            {"track_id": [1], "time_s": [0.0], "x": [0.0], "y": [0.0]},
            _feature(LINE, width=-2),
            "map.json: feature 0: width -2 is not a width in metres above 0",
        ),
        (
            {"track_id": [1], "time_s": [0.0], "x": [0.0], "y": [0.0]},
            _feature(LINE, lane_type="tram"),
            "map.json: feature 0: lane_type 'tram' is not one of VEHICLE, BIKE, BUS",
        ),
        (
            {"track_id": [1], "time_s": [0.0], "x": [0.0], "y": [0.0]},
            _feature(LINE, id="lane-a"),
            "map.json: feature 0: id 'lane-a' is not an integer (AV2's lane ids are)",
        ),
        (
            {"track_id": [1], "time_s": [0.0], "x": [0.0], "y": [0.0]},
            _feature(LINE, successors=3),
            "map.json: feature 0: successors 3 is not a list of lane ids",
        ),
        (
            {"track_id": [1], "time_s": [0.0], "x": [0.0], "y": [0.0]},
            {
                "type": "FeatureCollection",
                "features": [{"geometry": LINE, "id": 4}, {"geometry": LINE, "properties": {"id": 4}}],
            },
            "map.json: two lanes have the id 4",
        ),
        (
            {"track_id": [1], "time_s": [0.0], "x": [0.0], "y": [0.0]},
            {"lane_segments": {"1": {"id": 1}}},
            "map.json: not a readable AV2 map archive (KeyError: 'left_lane_boundary')",
        ),
    ],
)
def test_bad_tracks_and_maps_fail_in_one_line_that_names_the_file(tracks, map_data, message, tmp_path, capsys):
    pd.DataFrame(tracks).to_csv(tmp_path / "tracks.csv", index=False)
    (tmp_path / "map.json").write_text(json.dumps(map_data))
    args = ["convert", str(tmp_path / "out"), "-t", str(tmp_path / "tracks.csv"), "--map", str(tmp_path / "map.json")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("fpeft: error: ") and message in err, err


def test_files_that_are_not_tracks_or_logs_of_one_name_fail_in_one_line(tmp_path, capsys):
    (tmp_path / "map.json").write_text(json.dumps(GOOD_MAP))
    (tmp_path / "a").mkdir()
    t = np.arange(TOTAL_STEPS) / 10
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir(exist_ok=True)
        pd.DataFrame({"track_id": 1, "time_s": t, "x": t, "y": 0.0}).to_csv(tmp_path / folder / "log.csv", index=False)
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not tracks")
    for tracks, message in (
        ([tmp_path / "missing.csv"], f"{tmp_path / 'missing.csv'}: no such tracks file"),
        ([tmp_path / "broken.parquet"], f"{tmp_path / 'broken.parquet'}: unreadable as parquet ("),
        ([tmp_path / "a" / "log.csv", tmp_path / "b" / "log.csv"], "two logs are named log ("),
        ([tmp_path / "a", tmp_path / "b"], "two logs are named log ("),  # folders: their files
        ([tmp_path / "empty"], f"{tmp_path / 'empty'}: a folder without tracks files (.csv, .csv.gz, .parquet, .pq)"),
    ):
        args = ["convert", str(tmp_path / "out"), "--map", str(tmp_path / "map.json")]
        assert main(args + [a for p in tracks for a in ("-t", str(p))]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"fpeft: error: {message}") and len(err.strip().splitlines()) == 1, err
    args = ["convert", str(tmp_path / "out"), "--map", str(tmp_path / "map.json"), "-t", str(tmp_path / "a")]
    assert main(args + ["convert.focal_types=[cyclist,static]"]) == 1
    assert capsys.readouterr().err == (
        "fpeft: error: convert.focal_types: 'static' cannot be a focal agent; the types that can: vehicle, "
        "pedestrian, motorcyclist, cyclist, bus\n"
    )


def test_a_full_disk_stops_convert_in_one_line_and_the_same_command_adds_the_rest(sample_dir, tmp_path, monkeypatch):
    """pyarrow's full-disk error in a writing thread: the command's one-line error, no half-written
    folder; run again, the scenarios written are kept and the rest added."""
    from forecast_peft.data import av2_format
    from forecast_peft.errors import UserError

    tracks, _ = _sample_tracks(sample_dir)
    tracks.to_csv(tmp_path / "drive.csv", index=False)
    map_file = next(sample_dir.glob("log_map_archive_*.json"))
    calls, real = full_disk_at(monkeypatch, 3)
    run = dict(split="val", focal_per_window=50, workers=2, progress=False)
    with pytest.raises(UserError, match=r"cannot write the scenario .* \(Error writing bytes to file"):
        convert([tmp_path / "drive.csv"], map_file, tmp_path / "data", **run)
    written = list((tmp_path / "data" / "val").iterdir())
    assert 2 <= len(written) < len(calls) and all(any(d.glob("scenario_*.parquet")) for d in written)
    monkeypatch.setattr(av2_format.pq, "write_table", real)
    again = convert([tmp_path / "drive.csv"], map_file, tmp_path / "data", **run)
    whole = convert([tmp_path / "drive.csv"], map_file, tmp_path / "fresh", **run)["written"]
    assert again["present"] == len(written) and again["present"] + again["written"] == whole
    assert sorted(d.name for d in (tmp_path / "data" / "val").iterdir()) == sorted(
        d.name for d in (tmp_path / "fresh" / "val").iterdir()
    )


def test_lanes_without_successors_or_predecessors_join_those_that_start_or_end_where_they_end_or_start(tmp_path):
    from forecast_peft.data.convert import read_map

    def line(*points):
        return {"type": "LineString", "coordinates": [list(p) for p in points]}

    features = [
        {"geometry": line((0, 0), (50, 0)), "properties": {"id": 1}},
        {"geometry": line((50.3, 0.2), (100, 0)), "properties": {"id": 2}},  # starts 0.36 m from 1's end
        {"geometry": line((50, 0), (60, 40)), "properties": {"id": 3, "predecessors": []}},  # given: kept
        {"geometry": line((100, 0), (150, 0)), "properties": {"id": 4}},
        {"geometry": line((100.6, 0), (100.6, 50)), "properties": {"id": 5}},  # 0.6 m from 2's end: apart
        {"geometry": line((150, 0), (0, 0)), "properties": {"id": 6, "successors": [2]}},  # given: kept
    ]
    (tmp_path / "m.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    lanes = {lane["id"]: lane for lane in read_map(tmp_path / "m.geojson", 3.5, np.zeros(2)).lanes}
    assert {i: lane["successors"] for i, lane in lanes.items()} == {1: [2, 3], 2: [4], 3: [], 4: [6], 5: [], 6: [2]}
    assert {i: lane["predecessors"] for i, lane in lanes.items()} == {1: [6], 2: [1], 3: [], 4: [2], 5: [], 6: [4]}


def test_logs_of_ones_own_go_through_tuning_evaluation_and_forecasts(pretrained_ckpt, tmp_path, capsys):
    """A drive on a GeoJSON street grid (the convert benchmark's, 1 minute): converted, a PEFT run
    tunes on it, eval scores it beside the baselines and predict writes its forecasts."""
    from benchmarks.bench_data import grid_drive

    tracks, streets, _ = grid_drive(tmp_path, minutes=1.0, alive=20)
    data = tmp_path / "data"
    for split, stride in (("train", "2"), ("val", "5")):
        args = ["convert", str(data), "-t", str(tracks), "--map", str(streets), "--split", split]
        assert main(args + [f"convert.stride_s={stride}", "convert.focal_per_window=2"]) == 0
    written = {split: len(list((data / split).iterdir())) for split in ("train", "val")}
    assert written["train"] > written["val"] > 4
    run = tmp_path / "peft"
    common = [f"data.root={data}", "data.num_workers=0", "data.eval_batch_size=8"]
    assert (
        main(
            [
                "tune",
                "--mode",
                "peft",
                "--pretrained",
                str(pretrained_ckpt),
                f"data.root={data}",
                *TINY,
                "trainer.max_epochs=1",
                f"run_dir={run}",
            ]
        )
        == 0
    )
    assert f"train: {written['train']} scenarios, read {written['train']}" in capsys.readouterr().out
    assert main(["eval", "-c", str(run), *common, "--out", str(tmp_path / "report")]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert {row["name"] for row in report} >= {"constant_velocity", "lane_following"}
    assert all(row["scenes"] == written["val"] for row in report) and len(report) == 4
    forecasts = tmp_path / "forecasts.csv"
    assert main(["predict", "-c", str(run), *common, "--split", "val", "--out", str(forecasts)]) == 0
    assert len(pd.read_csv(forecasts)) == written["val"] * 6 * 60


def test_parts_of_one_log_by_time_go_to_two_splits_without_overlap(tmp_path, capsys):
    t = np.arange(300) / 10  # 30 s
    pd.DataFrame({"track_id": 1, "time_s": t, "x": 10 * t - 150, "y": 0.0}).to_csv(tmp_path / "drive.csv", index=False)
    lane = {"type": "LineString", "coordinates": [[-300, 0], [300, 0]]}
    (tmp_path / "m.json").write_text(json.dumps(_feature(lane)))
    args = ["convert", str(tmp_path / "d"), "-t", str(tmp_path / "drive.csv"), "--map", str(tmp_path / "m.json")]
    for split, part in (("train", "[0,15]"), ("val", "[15,29.9]")):
        assert main(args + ["--split", split, "convert.stride_s=1", f"convert.time_range_s={part}"]) == 0
        captured = capsys.readouterr()
        assert "wrote 5 scenarios" in captured.out and "over the same time" not in captured.err
    logs = json.loads((tmp_path / "d" / ".convert_logs.json").read_text())
    assert logs == {"train": {"drive": [[0, 149]]}, "val": {"drive": [[150, 299]]}}
    # the whole log for the test split: it overlaps both, said for each
    assert main(args + ["--split", "test", "convert.stride_s=5"]) == 0
    err = capsys.readouterr().err
    assert "in the train split too, over the same time (drive)" in err and "in the val split too" in err
    assert main(args + ["convert.time_range_s=[10,15]"]) == 1
    assert (
        "no log has 11 s within convert.time_range_s=[10, 15], which a train scenario needs" in capsys.readouterr().err
    )
    assert main(args + ["convert.time_range_s=[5,2]"]) == 1
    assert "convert.time_range_s must be [start, end] in seconds, 0 <= start < end" in capsys.readouterr().err
