import numpy as np
import pandas as pd
import pytest

from forecast_peft.data.av2_reader import extract
from forecast_peft.data.features import FEATURE_KEYS
from tests.reference_extractor import reference_extract

KEYS = set(FEATURE_KEYS)


@pytest.fixture(scope="module")
def feats(sample_dir):
    return extract(sample_dir, split="val")


def test_keys_and_shapes(feats):
    assert set(feats) == KEYS
    a = feats["x"].shape[0]
    n_lanes = feats["lane_positions"].shape[0]
    assert feats["x"].shape == (a, 50, 2)
    assert feats["y"].shape == (a, 60, 2)
    assert feats["x_padding_mask"].shape == (a, 110)
    assert feats["lane_positions"].shape == (n_lanes, 20, 2)
    assert feats["lane_attr"].shape == (n_lanes, 3)
    assert feats["scenario_id"] == "0a1e6f0a-1817-4a98-b02e-db8c9327d151"
    assert feats["track_id"] == "138951" and feats["city"] == "austin"


def test_frame_and_focal(feats, sample_dir):
    df = pd.read_parquet(next(sample_dir.glob("*.parquet")))
    row = df[(df.track_id == "138951") & (df.timestep == 49)].iloc[0]
    np.testing.assert_allclose(feats["origin"][0], [row.position_x, row.position_y], atol=1e-3)
    assert feats["theta"] == pytest.approx(row.heading, abs=1e-6)
    # focal first, at the origin, heading along +x, observed over all 110 steps
    np.testing.assert_allclose(feats["x_centers"][0], 0, atol=1e-6)
    assert feats["x_angles"][0, 49] == pytest.approx(0, abs=1e-6)
    assert not feats["x_padding_mask"][0].any()
    assert feats["x_attr"][0, 1] == 3  # focal category
    # the focal's future ends where the parquet says, in the local frame
    last = df[(df.track_id == "138951") & (df.timestep == 109)].iloc[0]
    c, s = np.cos(row.heading), np.sin(row.heading)
    d = np.array([last.position_x - row.position_x, last.position_y - row.position_y])
    np.testing.assert_allclose(feats["y"][0, -1], d @ np.array([[c, -s], [s, c]]), atol=1e-3)


def test_padding_rules(feats):
    pad = feats["x_padding_mask"]
    assert not pad[:, 49].any()  # every actor is observed now
    static = feats["x_attr"][:, 0] >= 5
    assert pad[static, 50:].all()
    assert (feats["y"][pad[:, 50:]] == 0).all()
    lp = feats["lane_padding_mask"]
    assert (feats["lane_positions"][lp] == 0).all()
    assert not lp.all(axis=1).any()
    assert (np.abs(feats["lane_positions"]) <= 150).all()


def test_lane_count_in_box(feats, sample_dir):
    from av2.map.map_api import ArgoverseStaticMap

    m = ArgoverseStaticMap.from_json(next(sample_dir.glob("*.json")))
    nearby = m.get_nearby_lane_segments(feats["origin"][0], 150)
    assert len(feats["lane_positions"]) <= len(nearby) == 71
    assert len(feats["lane_positions"]) == 71


def test_matches_literal_reference(feats, sample_dir):
    ref = reference_extract(sample_dir)
    for key in KEYS:
        if isinstance(ref[key], str):
            assert feats[key] == ref[key], key
        else:
            np.testing.assert_allclose(
                np.asarray(feats[key], np.float64), np.asarray(ref[key], np.float64), atol=1e-4, err_msg=key
            )


def test_test_split_has_no_future(sample_dir, tmp_path):
    df = pd.read_parquet(next(sample_dir.glob("*.parquet")))
    out = tmp_path / sample_dir.name
    out.mkdir()
    df[df.timestep < 50].to_parquet(out / f"scenario_{sample_dir.name}.parquet")
    (out / f"log_map_archive_{sample_dir.name}.json").write_bytes(next(sample_dir.glob("*.json")).read_bytes())
    feats = extract(out, split="test")
    assert feats["y"] is None
    assert feats["x_padding_mask"][:, 50:].all()


def test_world_frame_round_trip(feats, sample_dir):
    """Predictions go back to city coordinates: the focal's local future maps onto its parquet rows."""
    import torch

    from forecast_peft.evaluation import to_world

    df = pd.read_parquet(next(sample_dir.glob("*.parquet")))
    focal = df[(df.track_id == "138951") & (df.timestep >= 50)].sort_values("timestep")
    y = torch.from_numpy(feats["y"][0]).double()[None, None]  # [1, 1, 60, 2]
    world = to_world(y, torch.from_numpy(feats["origin"]).double(), torch.tensor([float(feats["theta"])]).double())
    np.testing.assert_allclose(world[0, 0].numpy(), focal[["position_x", "position_y"]].to_numpy(), atol=2e-3)


@pytest.mark.parametrize("shift", [(0, 0), (120, 0), (-40, 150), (160, 60), (0, -175), (300, 300)])
def test_nearby_lanes_match_av2(sample_dir, shift):
    """The vectorised lane search returns exactly av2's get_nearby_lane_segments, also where the
    box cuts through lanes."""
    from av2.map.map_api import ArgoverseStaticMap

    from forecast_peft.data.av2_reader import _boundaries, nearby_segments

    m = ArgoverseStaticMap.from_json(next(sample_dir.glob("*.json")))
    segments = list(m.vector_lane_segments.values())
    center = np.array([-436.0, 1330.0]) + np.array(shift, dtype=float)
    expected = [s.id for s in m.get_nearby_lane_segments(center, 150.0)]
    bounds, lengths = _boundaries(segments)
    got = [segments[i].id for i in nearby_segments(bounds, lengths, center, 150.0)]
    assert got == expected
