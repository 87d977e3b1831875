"""`fpeft eval --forecasts FILE`: forecasts made elsewhere (an AV2 submission, a forecast table)
scored beside checkpoints and baselines."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from forecast_peft.cli import main
from forecast_peft.constants import METRICS
from forecast_peft.data.dataset import ForecastDataset
from forecast_peft.evaluation import constant_velocity, kinematic_modes, to_world
from forecast_peft.forecast_files import forecast_table, read_forecasts


def _world_forecasts(root, predictor) -> dict:
    """A baseline's forecasts of the val split in the scenarios' own frame, as a submission's
    ``{scenario: (probabilities [6], {focal track: [6, 60, 2]})}``."""
    dataset = ForecastDataset(root / "cache", "val")
    batch = dataset.__getitems__(list(range(len(dataset))))
    y_hat, pi = predictor(batch)
    probs = torch.softmax(pi.double(), -1).numpy()
    world = to_world(y_hat.double(), batch["origin"].double(), batch["theta"].double()).numpy()
    return {sid: (probs[i], {batch["track_id"][i]: world[i]}) for i, sid in enumerate(batch["scenario_id"])}


def _submission(predictions: dict) -> pd.DataFrame:
    """av2's ChallengeSubmission parquet layout: a row per scenario, track and mode."""
    rows = [
        (sid, track, float(p[k]), traj[k, :, 0], traj[k, :, 1])
        for sid, (p, tracks) in predictions.items()
        for track, traj in tracks.items()
        for k in range(len(p))
    ]
    columns = ["scenario_id", "track_id", "probability", "predicted_trajectory_x", "predicted_trajectory_y"]
    return pd.DataFrame(rows, columns=columns)


@pytest.fixture(scope="module")
def kinematic_files(synth_root, tmp_path_factory):
    """kinematic_modes' forecasts of the val split as av2 writes a submission, and as a gzipped
    forecast table (`fpeft predict --out NAME.csv.gz`)."""
    from av2.datasets.motion_forecasting.eval.submission import ChallengeSubmission

    folder = tmp_path_factory.mktemp("forecasts")
    predictions = _world_forecasts(synth_root, kinematic_modes)
    ChallengeSubmission(predictions).to_parquet(folder / "submission.parquet")
    forecast_table(predictions).to_csv(folder / "table.csv.gz", index=False)
    return folder / "submission.parquet", folder / "table.csv.gz"


def _eval(root, out, *args) -> list[dict]:
    assert main(["eval", f"data.root={root}", "data.num_workers=0", "--out", str(out), *args]) == 0
    return json.loads((out / "report.json").read_text())


def test_a_baseline_s_forecasts_from_a_file_score_as_the_baseline(synth_root, kinematic_files, tmp_path, capsys):
    """A submission and a forecast table of kinematic_modes' forecasts, in city coordinates, score
    what kinematic_modes scores itself on every metric (its scores as probabilities, its modes
    back in the focal frame), row for row and scene for scene; either may be the reference."""
    parquet, table = kinematic_files
    rows = _eval(
        synth_root, tmp_path, "baselines=[kinematic_modes]", "--forecasts", str(parquet), "--forecasts", str(table)
    )
    out = capsys.readouterr().out
    assert [row["name"] for row in rows] == ["kinematic_modes", "submission.parquet", "table.csv.gz"]
    assert [row.get("forecasts") for row in rows] == [None, str(parquet), str(table)]
    for row in rows[1:]:
        assert row["scenes"] == 16 and row["trainable_params"] == 0
        for metric in METRICS:
            assert row[metric] == pytest.approx(rows[0][metric], abs=1e-4), (row["name"], metric)
            assert row["paired"]["diff"][metric] == pytest.approx(0, abs=1e-4)
    per_scene = pd.read_csv(tmp_path / "per_scenario.csv", dtype={"scenario_id": str})
    by_row = {name: frame.set_index("scenario_id")[list(METRICS)] for name, frame in per_scene.groupby("name")}
    for name in ("submission.parquet", "table.csv.gz"):
        pd.testing.assert_frame_equal(by_row[name], by_row["kinematic_modes"], atol=1e-4, check_names=False)
    summary = pd.read_csv(tmp_path / "report.csv")
    assert summary["forecasts"].fillna("").tolist() == ["", str(parquet), str(table)]
    assert "note:" not in out  # six modes each, probabilities that sum to 1
    # a file as the reference, by its path
    rows = _eval(synth_root, tmp_path / "ref", "--forecasts", str(parquet), "--reference", str(parquet))
    assert rows[0]["paired"]["reference"] == "submission.parquet"
    assert "Difference from submission.parquet" in capsys.readouterr().out


def test_a_file_of_fewer_modes_is_scored_on_those_it_has(synth_root, tmp_path, capsys):
    """One mode per scenario, probabilities that do not sum to 1: constant velocity's trajectory
    alone scores constant_velocity's minFDE6 (its 6 modes are that one trajectory), its K=1 and
    K=6 metrics are equal, and two notes say what scoring it took."""
    predictions = _world_forecasts(synth_root, constant_velocity)
    one = {
        sid: (np.array([0.5]), {t: traj[:1] for t, traj in tracks.items()}) for sid, (_, tracks) in predictions.items()
    }
    path = tmp_path / "one.parquet"
    _submission(one).to_parquet(path)
    rows = _eval(synth_root, tmp_path / "out", "baselines=[constant_velocity]", "--forecasts", str(path))
    out = capsys.readouterr().out
    assert f"note: --forecasts {path}: 16 forecasts of fewer than 6 modes" in out
    assert f"note: --forecasts {path}: the probabilities of 16 forecasts do not sum to 1" in out
    cv, mine = rows
    for metric in ("minADE6", "minFDE6", "MR6", "minADE1", "minFDE1"):
        assert mine[metric] == pytest.approx(cv[metric], abs=1e-4), metric
    assert mine["minFDE1"] == pytest.approx(mine["minFDE6"]) and mine["minADE1"] == pytest.approx(mine["minADE6"])
    assert mine["brier-minFDE6"] == pytest.approx(mine["minFDE6"], abs=1e-5)  # probability 1 after normalising
    forecasts = read_forecasts(path)
    assert forecasts.short == 16 and forecasts.unnormalised == 16
    np.testing.assert_array_equal(forecasts.probs[:, 0], 1.0)
    np.testing.assert_array_equal(forecasts.probs[:, 1:], 0.0)
    np.testing.assert_array_equal(forecasts.world[:, 1:], np.repeat(forecasts.world[:, :1], 5, axis=1))


def test_a_table_s_rows_may_come_in_any_order(kinematic_files, tmp_path):
    """A forecast table with its rows shuffled (written by another tool) reads as the one in
    `fpeft predict`'s order, which is read without sorting it."""
    from forecast_peft.forecast_files import _in_order, _read_table

    table = kinematic_files[1]
    # read as eval reads it (pyarrow): its numbers come exact on every version the project allows,
    # where pandas 2.0's parser reads 1 in 6 one unit in the last place off and pandas 3 deprecates
    # float_precision="round_trip", the argument that once kept them exact
    frame = _read_table(table)
    shuffled = tmp_path / "shuffled.csv.gz"
    frame.sample(frac=1, random_state=0).to_csv(shuffled, index=False)
    keys = [frame[c].to_numpy() for c in ("scenario_id", "track_id", "mode", "step")]
    assert _in_order(keys) and not _in_order([k[::-1] for k in keys])
    assert _in_order([np.array([0, 0, 1, 1]), np.array([3, 5, 0, 1])])
    assert not _in_order([np.array([0, 0, 1, 1]), np.array([3, 5, 1, 0])])
    ordered, mixed = read_forecasts(table), read_forecasts(shuffled)
    assert ordered.rows.keys() == mixed.rows.keys() and len(ordered.rows) == 16
    at = [mixed.rows[key] for key in ordered.rows]
    np.testing.assert_array_equal(mixed.world[at], ordered.world)
    np.testing.assert_array_equal(mixed.probs[at], ordered.probs)
    np.testing.assert_array_equal(mixed.modes[at], ordered.modes)


def _broken(frame: pd.DataFrame, ids: list[str], how: str) -> pd.DataFrame:
    frame = frame.copy()
    if how == "lacks one":
        return frame[frame.scenario_id != ids[0]]
    if how == "other track":
        frame.loc[frame.scenario_id == ids[2], "track_id"] = "nobody"
    elif how == "seven modes":
        frame = pd.concat([frame, frame[frame.scenario_id == ids[1]].iloc[:1]])
    elif how == "50 steps":
        frame["predicted_trajectory_x"] = [x[:50] for x in frame.predicted_trajectory_x]
    elif how == "negative":
        frame.loc[frame.index[3], "probability"] = -0.25
    elif how == "no probability":
        frame = frame.rename(columns={"probability": "score"})
    elif how == "a NaN":
        frame.at[frame.index[4], "predicted_trajectory_y"] = np.r_[frame.predicted_trajectory_y.iloc[4][:-1], np.nan]
    return frame


@pytest.mark.parametrize(
    ("how", "says"),
    [
        ("lacks one", "no forecast of 1 of the 16 scenarios scored (split 'val' of {root}; scenario {0}): take "
         "those it holds alone with --scenarios {path}"),
        ("other track", "1 scenario forecast another track than the focal one: scenario {2} forecasts track "
         "nobody, its focal track is "),
        ("seven modes", "7 forecasts of track {t1} in scenario {1}; the metrics take at most 6 a track"),
        ("50 steps", "96 forecasts of 50 steps in predicted_trajectory_x, not 60 (scenario "),
        ("negative", "1 probability negative or not a number (scenario "),
        ("no probability", "no column probability (its columns: scenario_id, track_id, score, "),
        ("a NaN", "1 forecast with a coordinate that is empty or not a finite number (scenario "),
    ],
)  # fmt: skip
def test_a_file_that_cannot_be_scored_fails_in_one_line_before_any_scoring(
    synth_root, kinematic_files, tmp_path, capsys, how, says
):
    frame = pd.read_parquet(kinematic_files[0])
    ids = sorted(frame.scenario_id.unique())
    track = dict(zip(frame.scenario_id, frame.track_id))
    path = tmp_path / "broken.parquet"
    _broken(frame, ids, how).to_parquet(path)
    args = ["eval", f"data.root={synth_root}", "data.num_workers=0", "--out", str(tmp_path / "out")]
    assert main(args + ["--forecasts", str(path)]) == 1
    captured = capsys.readouterr()
    meant = says.format(*ids, root=synth_root, path=path, t1=track[ids[1]])
    assert captured.err.startswith(f"fpeft: error: --forecasts {path}: {meant}"), captured.err
    assert len(captured.err.strip().splitlines()) == 1 and "eval " not in captured.err + captured.out
    if how == "lacks one":  # what the line advises: the file's own scenarios, scored alone
        rows = _eval(synth_root, tmp_path / "held", "--forecasts", str(path), "--scenarios", str(path))
        assert [row["scenes"] for row in rows] == [15] * 4


def test_files_that_are_no_forecasts_of_the_split_fail_in_one_line(synth_root, kinematic_files, tmp_path, capsys):
    """Another split's forecasts, a file that is not parquet, a table short of a step, a missing file."""
    args = ["eval", f"data.root={synth_root}", "data.num_workers=0", "--out", str(tmp_path / "out")]
    parquet, table = kinematic_files
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    short = tmp_path / "short.csv"
    rows = pd.read_csv(table, dtype={"scenario_id": str, "track_id": str})
    rows.drop(index=rows.index[-1]).to_csv(short, index=False)
    for extra, meant in (
        (["--split", "train"], f"{parquet}: none of the 24 scenarios scored (split 'train' of {synth_root}) is in it"),
        ([], f"{junk}: cannot be read as a parquet submission ("),
        ([], f"{short}: a mode without each step 1-60 once (scenario {rows.scenario_id.iloc[-1]}, track "),
        ([], f"{tmp_path / 'none.parquet'}: the file does not exist"),
    ):
        path = meant.split(":")[0]
        assert main(args + extra + ["--forecasts", path]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"fpeft: error: --forecasts {meant}") and len(err.strip().splitlines()) == 1, err


def test_a_table_with_a_coordinate_that_is_no_number_fails_in_one_line(synth_root, kinematic_files, tmp_path, capsys):
    """A word where a table has a number: the line names its column; an empty coordinate (read as
    NaN, which would make the metrics NaN): the line names its scenario."""
    args = ["eval", f"data.root={synth_root}", "data.num_workers=0", "--out", str(tmp_path / "out")]
    rows = pd.read_csv(kinematic_files[1], dtype={"scenario_id": str, "track_id": str})
    word, empty = rows.astype({"x": object}), rows.astype({"y": object})
    word.loc[7, "x"] = "east"
    empty.loc[len(rows) - 1, "y"] = ""
    nan = f"1 forecast with a coordinate that is empty or not a finite number (scenario {rows.scenario_id.iloc[-1]}, "
    for name, frame, meant in (
        ("word.csv", word, ["cannot be read as a CSV forecast table (column x: ", "'east'"]),
        ("empty.csv.gz", empty, [nan]),
    ):
        path = tmp_path / name
        frame.to_csv(path, index=False)
        assert main(args + ["--forecasts", str(path)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"fpeft: error: --forecasts {path}: {meant[0]}") and meant[-1] in err, err
        assert len(err.strip().splitlines()) == 1


def test_viz_draws_a_file_s_forecasts_in_a_panel_of_its_own(synth_root, kinematic_files, tmp_path, monkeypatch):
    """`fpeft viz --forecasts FILE`: a panel per file, after the checkpoints' and before the
    baselines', with the file's modes where the baseline that made them draws its own; a file
    first ranks the split by its minFDE6 (--select worst), and a track of one mode draws that one
    alone, not the copies that fill it up to 6 for the metrics."""
    from forecast_peft import viz

    panels, draw = [], viz.draw_scene

    def record(batch, index, forecasts, path, title=""):
        panels.append((title, [(label.split("\n")[0], y_hat, pi) for label, y_hat, pi in forecasts]))
        return draw(batch, index, forecasts, path, title)

    monkeypatch.setattr(viz, "draw_scene", record)
    parquet, _ = kinematic_files
    predictions = _world_forecasts(synth_root, constant_velocity)
    one = {
        sid: (np.array([1.0]), {t: traj[:1] for t, traj in tracks.items()}) for sid, (_, tracks) in predictions.items()
    }
    single = tmp_path / "one.parquet"
    _submission(one).to_parquet(single)
    common = [f"data.root={synth_root}", "data.num_workers=0", "--select", "worst", "--num", "3"]
    args = ["viz", "--forecasts", str(parquet), "--forecasts", str(single), "--baseline", "kinematic_modes"]
    assert main(args + common + ["--out", str(tmp_path / "pics")]) == 0
    rows = _eval(synth_root, tmp_path / "report", "baselines=[]", "--forecasts", str(parquet))
    assert rows[0]["name"] == "submission.parquet"
    scores = pd.read_csv(tmp_path / "report" / "per_scenario.csv", dtype={"scenario_id": str})
    worst = scores.sort_values("minFDE6", ascending=False, kind="stable")["scenario_id"].head(3).tolist()
    assert [title for title, _ in panels] == worst
    assert sorted(p.name for p in (tmp_path / "pics").glob("*.png")) == [
        f"worst{i:03d}_{s}.png" for i, s in enumerate(worst, 1)
    ]
    for _, ((file_name, file_modes, file_pi), (one_name, one_modes, _), (base_name, base_modes, base_pi)) in panels:
        assert (file_name, one_name, base_name) == ("submission.parquet", "one.parquet", "kinematic_modes")
        torch.testing.assert_close(file_modes, base_modes, atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.softmax(file_pi, -1), torch.softmax(base_pi, -1), atol=1e-6, rtol=0)
        assert one_modes.shape == (1, 60, 2)
