"""Report intervals: per-row 95% half-widths and paired differences from a reference row."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from forecast_peft.cli import main
from forecast_peft.constants import METRICS
from forecast_peft.errors import UserError
from forecast_peft.reports import (
    FIXED_RANKING_MIN_SCENES,
    add_groups,
    add_intervals,
    add_mode_ranking,
    format_table,
    t95,
    write_reports,
)

# two-sided 95% quantiles of Student's t, from a printed table: 2, 3 and 4 degrees of freedom
T95_2, T95_3, T95_4 = 4.302653, 3.182446, 2.776445


def frame(name: str, ids: list[str], min_fde6: list[float]) -> pd.DataFrame:
    data = {m: np.arange(len(ids), dtype=float) for m in METRICS}
    data["minFDE6"] = np.asarray(min_fde6, float)
    columns = {"focal_type": "vehicle", "manoeuvre": "straight", "city": "austin"}
    return pd.DataFrame({"name": name, "scenario_id": ids, **columns, **data})


def row(name: str, per_scene: pd.DataFrame) -> dict:
    mine = per_scene[per_scene["name"] == name]
    return {"name": name, **{m: float(mine[m].mean()) for m in METRICS}, "scenes": len(mine), "trainable_params": 0}


@pytest.fixture
def report():
    # B scored one scenario A did not (s5), in another order; on the shared four, B - A = 1, 2, 3, 6
    a = frame("A", ["s1", "s2", "s3", "s4"], [10.0, 10.0, 10.0, 10.0])
    b = frame("B", ["s4", "s5", "s2", "s1", "s3"], [16.0, 99.0, 12.0, 11.0, 13.0])
    per_scene = pd.concat([a, b], ignore_index=True)
    return [row("A", per_scene), row("B", per_scene)], per_scene


def test_paired_difference_and_its_interval_by_hand(report):
    rows, per_scene = report
    add_intervals(rows, per_scene)
    assert "paired" not in rows[0]
    paired = rows[1]["paired"]
    assert paired["reference"] == "A" and paired["scenes"] == 4
    assert paired["diff"]["minFDE6"] == pytest.approx(3.0)
    # differences 1, 2, 3, 6: sample variance (4 + 1 + 0 + 9) / 3
    assert paired["ci95"]["minFDE6"] == pytest.approx(T95_3 * math.sqrt(14 / 3) / 2)
    # each row's own interval: A's minFDE6 is constant, B's is 16, 99, 12, 11, 13
    assert rows[0]["ci95"]["minFDE6"] == pytest.approx(0.0)
    assert rows[1]["ci95"]["minFDE6"] == pytest.approx(T95_4 * np.std([16, 99, 12, 11, 13], ddof=1) / math.sqrt(5))


def test_intervals_widen_for_few_scenes_and_approach_the_normal_for_many():
    # the normal quantile, 1.96, would make a 5-scene interval 41% too narrow
    assert t95(2) == pytest.approx(12.706205, rel=1e-6)
    assert t95(5) == pytest.approx(T95_4, rel=1e-6)
    assert t95(21) == pytest.approx(2.085963, rel=1e-6)
    assert t95(100) == pytest.approx(1.984217, rel=1e-6)
    assert 1.959964 < t95(25_000) < 1.960100


def test_the_reference_row_can_be_any_row(report):
    rows, per_scene = report
    add_intervals(rows, per_scene, reference="B")
    assert "paired" not in rows[1]
    assert rows[0]["paired"]["reference"] == "B"
    assert rows[0]["paired"]["diff"]["minFDE6"] == pytest.approx(-3.0)


def test_tables_and_json_carry_the_intervals(report, tmp_path):
    rows, per_scene = report
    add_intervals(rows, per_scene)
    table = format_table(rows)
    assert "Difference from A over the same scenarios" in table
    half = T95_3 * math.sqrt(14 / 3) / 2
    assert f"+3.000 ± {half:.3f}" in table
    paths = write_reports(rows, per_scene, tmp_path)
    written = json.loads(paths["json"].read_text())
    assert written[1]["paired"]["diff"]["minFDE6"] == pytest.approx(3.0)
    assert set(written[0]["ci95"]) == set(METRICS)
    assert "Difference from A" in paths["md"].read_text()


def test_metrics_by_focal_agent_type(report, tmp_path):
    rows, per_scene = report
    # A: s1 and s3 pedestrians; B: s1, s3 and s5 (B alone scored s5)
    per_scene["focal_type"] = np.where(per_scene["scenario_id"].isin(["s1", "s3", "s5"]), "pedestrian", "vehicle")
    add_intervals(rows, per_scene)
    add_groups(rows, per_scene)
    # A's other metrics are 0, 1, 2, 3 on s1..s4 (frame()): vehicles s2 and s4
    assert rows[0]["by_focal_type"]["vehicle"] == {"scenes": 2, **{m: 2.0 for m in METRICS}, "minFDE6": 10.0}
    b = rows[1]["by_focal_type"]
    assert list(b) == ["pedestrian", "vehicle"]  # the most frequent first
    assert b["pedestrian"]["scenes"] == 3 and b["pedestrian"]["minFDE6"] == pytest.approx((11 + 13 + 99) / 3)
    assert b["vehicle"]["scenes"] == 2 and b["vehicle"]["minFDE6"] == pytest.approx(14.0)
    table = format_table(rows)
    assert "| name | pedestrian (2) | vehicle (2) |" in table  # counts of the first row
    assert f"| B | {(11 + 13 + 99) / 3:.3f} / " in table
    written = json.loads(write_reports(rows, per_scene, tmp_path)["json"].read_text())
    assert written[1]["by_focal_type"]["vehicle"]["scenes"] == 2
    one_type = per_scene.assign(focal_type="vehicle")
    add_groups(rows, one_type)
    assert "by the focal agent's type" not in format_table(rows)  # one type: the main table says it all


def test_metrics_by_city(report, tmp_path):
    """Adapting to a new city is what PEFT is for: a report over several cities says how each
    row does in each, beside the focal agent types."""
    rows, per_scene = report
    # A: s1, s2 in miami; B: s1, s2 and s5 (B alone scored s5)
    per_scene["city"] = np.where(per_scene["scenario_id"].isin(["s1", "s2", "s5"]), "miami", "palo-alto")
    per_scene.loc[per_scene["scenario_id"] == "s4", "focal_type"] = "cyclist"
    per_scene.loc[per_scene["scenario_id"] == "s2", "manoeuvre"] = "left turn"
    add_groups(rows, per_scene)
    assert rows[1]["by_manoeuvre"]["left turn"] == {"scenes": 1, **{m: 2.0 for m in METRICS}, "minFDE6": 12.0}
    # A's other metrics are 0, 1, 2, 3 on s1..s4 (frame()): palo-alto s3 and s4
    assert rows[0]["by_city"]["palo-alto"] == {"scenes": 2, **{m: 2.5 for m in METRICS}, "minFDE6": 10.0}
    b = rows[1]["by_city"]
    assert list(b) == ["miami", "palo-alto"]  # the most frequent first
    assert b["miami"]["scenes"] == 3 and b["miami"]["minFDE6"] == pytest.approx((11 + 12 + 99) / 3)
    assert list(rows[1]["by_focal_type"]) == ["vehicle", "cyclist"]
    table = format_table(rows)
    by_type, by_city = table.index("by the focal agent's type"), table.index("minFDE6 / MR6 by city (scenes):")
    by_manoeuvre = table.index("minFDE6 / MR6 by what the focal agent does over the 6 s (scenes; stationary: ends ")
    assert by_type < by_manoeuvre < by_city
    assert "| name | straight (3) | left turn (1) |" in table[by_manoeuvre:by_city]
    assert "| name | miami (2) | palo-alto (2) |" in table[by_city:]  # counts of the first row
    assert f"| B | {(11 + 12 + 99) / 3:.3f} / " in table[by_city:]
    paths = write_reports(rows, per_scene, tmp_path)
    assert json.loads(paths["json"].read_text())[1]["by_city"]["palo-alto"]["scenes"] == 2
    assert "city" in pd.read_csv(paths["csv"]).columns
    add_groups(rows, per_scene.assign(city="miami"))
    assert "by city" not in format_table(rows)  # one city: the main table says it all


def test_mode_ranking_and_the_note_on_a_checkpoint_that_ranks_one_mode_first_everywhere(tmp_path):
    """The demo's PEFT model put mode 1 first in all 100 validation scenes (its scores had
    learnt no more than a constant): its minFDE1, 25 m against constant velocity's 14.6, was one
    fixed mode's error, which the report did not say."""
    n = FIXED_RANKING_MIN_SCENES
    ids = [f"s{i:02d}" for i in range(n)]
    frames = []
    for name, top, best in (
        ("constant_velocity", [0] * n, [0] * n),  # a baseline: one ranking by design, no note
        ("fixed (run_a)", [1] * n, [1] * 5 + [3] * (n - 5)),
        ("varied (run_b)", [1] * (n - 1) + [4], [4] * n),
        ("few (run_c)", [2] * (n - 1), [2] * (n - 1)),  # one scene short of the note
    ):
        f = frame(name, ids[: len(top)], [1.0] * len(top))
        frames.append(f.assign(top_mode=top, best_mode=best, top_prob=0.3))
    per_scene = pd.concat(frames, ignore_index=True)
    rows = [row(name, per_scene) for name in per_scene["name"].unique()]
    for r in rows[1:]:
        r["checkpoint"] = f"{r['name'].split('(')[1][:-1]}/checkpoints/last.ckpt"
    add_mode_ranking(rows, per_scene)
    assert [r["top_modes"] for r in rows] == [{"0": n}, {"1": n}, {"1": n - 1, "4": 1}, {"2": n - 1}]
    assert [r["top_is_best"] for r in rows] == [1.0, 5 / n, 1 / n, 1.0]
    note = format_table(rows).split("\n")[-1]
    assert note.startswith(
        "Fixed ranking, the same mode first in every scenario (numbered from 0; fixed (run_a): mode 1)"
    )
    assert "varied" not in note and "few" not in note and "constant_velocity" not in note
    written = json.loads(write_reports(rows, per_scene, tmp_path)["json"].read_text())
    assert written[2]["top_modes"] == {"1": n - 1, "4": 1} and written[2]["top_is_best"] == 1 / n
    assert "Fixed ranking" in (tmp_path / "report.md").read_text()
    rows[2]["top_modes"] = {"4": n}  # two checkpoints with one mode first in every scene
    assert "(numbered from 0; fixed (run_a): mode 1; varied (run_b): mode 4): minADE1" in format_table(rows)


def test_one_scene_has_no_interval():
    per_scene = pd.concat([frame("A", ["s1"], [1.0]), frame("B", ["s1"], [2.5])], ignore_index=True)
    rows = [row("A", per_scene), row("B", per_scene)]
    add_intervals(rows, per_scene)
    assert rows[1]["ci95"]["minFDE6"] is None and rows[1]["paired"]["ci95"]["minFDE6"] is None
    assert "| B | " in format_table(rows) and "+1.500 |" in format_table(rows)
    json.dumps(rows, allow_nan=False)  # None, never NaN: report.json stays strict JSON


def test_a_nan_forecast_leaves_every_mean_of_its_row_nan_and_report_json_strict(tmp_path):
    """One NaN scene (a NaN forecast): the row's own mean was NaN, but its paired difference and its
    per-type mean (pandas' skipna) left the scene out while still counting it among the scenes,
    and report.json held bare NaN, which strict JSON readers refuse."""
    ids = ["s1", "s2", "s3", "s4"]
    a, b = frame("A", ids, [10.0, 10.0, 10.0, 10.0]), frame("B", ids, [11.0, np.nan, 12.0, 13.0])
    per_scene = pd.concat([a, b], ignore_index=True).assign(focal_type="vehicle")
    per_scene.loc[per_scene["scenario_id"] == "s4", "focal_type"] = "cyclist"
    rows = [
        {**row(name, per_scene), "minFDE6": float(f["minFDE6"].mean(skipna=False))} for name, f in (("A", a), ("B", b))
    ]
    add_intervals(rows, per_scene)
    add_groups(rows, per_scene)
    paired = rows[1]["paired"]
    assert paired["scenes"] == 4 and math.isnan(paired["diff"]["minFDE6"]) and math.isnan(paired["ci95"]["minFDE6"])
    assert paired["diff"]["minADE6"] == 0.0  # the other metrics are finite
    assert math.isnan(rows[1]["by_focal_type"]["vehicle"]["minFDE6"])  # s2 is a vehicle
    assert rows[1]["by_focal_type"]["cyclist"]["minFDE6"] == 13.0
    paired_table = format_table(rows).split("Difference from")[1].split("\n\n")[1].splitlines()
    header, b_row = paired_table[0].split(" | "), next(line for line in paired_table if line.startswith("| B |"))
    assert b_row.split(" | ")[header.index("minFDE6")] == "nan"  # not "+nan ± nan"
    paths = write_reports(rows, per_scene, tmp_path)
    written = json.loads(paths["json"].read_text(), parse_constant=lambda word: pytest.fail(f"{word} in report.json"))
    assert written[1]["minFDE6"] is None and written[1]["paired"]["diff"]["minFDE6"] is None
    assert written[1]["by_focal_type"]["vehicle"]["minFDE6"] is None and written[1]["minADE6"] == 1.5
    assert written[0]["minFDE6"] == 10.0 and "paired" not in written[0]  # the reference row
    csv = pd.read_csv(paths["csv"])
    assert csv.loc[(csv["name"] == "B") & (csv["scenario_id"] == "s2"), "minFDE6"].isna().all()
    summary = pd.read_csv(paths["summary"]).set_index("name")
    assert math.isnan(summary.loc["B", "minFDE6"]) and math.isnan(summary.loc["B", "minFDE6_diff"])
    assert summary.loc["B", "minADE6"] == 1.5


def _horizon_rows(report) -> tuple[list[dict], pd.DataFrame]:
    """The fixture's rows and scenes with minFDE6 at 1-5 s ahead (seconds / 6 of minFDE6), the rows
    with their by_horizon."""
    from forecast_peft.constants import HORIZON_COLUMNS

    rows, per_scene = report
    per_scene = per_scene.copy()
    for seconds, column in enumerate(HORIZON_COLUMNS, start=1):
        per_scene[column] = per_scene["minFDE6"] * seconds / 6
    add_intervals(rows, per_scene)
    return rows, per_scene


def test_minfde6_by_horizon_with_its_paired_difference(report, tmp_path):
    """Each row's minFDE6 at 1-6 s ahead (by_horizon), with its interval and, but for the
    reference row, its paired difference; in the table, report.json and report.csv."""
    from forecast_peft.constants import HORIZON_COLUMNS

    rows, per_scene = _horizon_rows(report)
    a, b = rows[0]["by_horizon"], rows[1]["by_horizon"]
    assert list(a) == ["1s", "2s", "3s", "4s", "5s", "6s"]
    assert a["6s"] == {"minFDE6": rows[0]["minFDE6"], "ci95": rows[0]["ci95"]["minFDE6"]}  # no difference
    # B's own mean over its five scenes, its difference over the four it shares with A (1, 2, 3, 6 at 6 s)
    assert b["3s"]["minFDE6"] == pytest.approx(np.mean([16, 99, 12, 11, 13]) / 2)
    assert b["3s"]["diff"] == pytest.approx(1.5) and b["6s"]["diff"] == rows[1]["paired"]["diff"]["minFDE6"]
    assert b["3s"]["diff_ci95"] == pytest.approx(T95_3 * math.sqrt(14 / 3) / 2 / 2)
    table = format_table(rows)
    assert "minFDE6 by horizon, each its nearest mode (as if the forecast ended there; at 6 s, minFDE6); in " in table
    assert "| name | 1 s | 2 s | 3 s | 4 s | 5 s | 6 s |" in table
    assert f"| A | {10 / 6:.3f} | {20 / 6:.3f} | 5.000 | " in table
    assert f"| {b['3s']['minFDE6']:.3f} (+1.500 ± {b['3s']['diff_ci95']:.3f}) |" in table
    paths = write_reports(rows, per_scene, tmp_path)
    assert json.loads(paths["json"].read_text())[1]["by_horizon"]["3s"]["diff"] == pytest.approx(1.5)
    summary = pd.read_csv(paths["summary"]).to_dict("records")
    assert summary[1]["minFDE6_3s"] == pytest.approx(b["3s"]["minFDE6"]) and summary[1]["minFDE6_3s_diff"] == 1.5
    assert summary[1]["minFDE6_1s_diff_ci95"] == pytest.approx(b["1s"]["diff_ci95"])
    assert pd.isna(summary[0]["minFDE6_5s_diff"]) and "minFDE6_6s" not in summary[0]  # at 6 s: minFDE6
    # a frame without the horizon columns (an older per_scenario.csv's): no horizons, no table
    rows = [{k: v for k, v in row.items() if k != "by_horizon"} for row in rows]
    add_intervals(rows, per_scene.drop(columns=list(HORIZON_COLUMNS)))
    assert "by_horizon" not in rows[0] and "by horizon" not in format_table(rows)


def test_the_report_plot_draws_each_row_s_horizons_and_differences_with_their_intervals(report, tmp_path):
    """eval --plot's report.png: a panel of each row's minFDE6 at 1-6 s with its 95% interval, and
    one of the paired differences from the reference (which has none of its own), the rows' points
    a little apart along the horizon, centred on it."""
    import matplotlib.pyplot as plt

    from forecast_peft.reports import PLOT_FILE, plot_report, report_figure

    rows, _ = _horizon_rows(report)
    fig = report_figure(rows)
    errors, diffs = fig.axes
    horizons = ["1s", "2s", "3s", "4s", "5s", "6s"]
    for ax, key, width, drawn in ((errors, "minFDE6", "ci95", rows), (diffs, "diff", "diff_ci95", rows[1:])):
        assert [c.get_label() for c in ax.containers] == [row["name"] for row in drawn]
        for container, row in zip(ax.containers, drawn, strict=True):
            line, _, (bars,) = container.lines
            want = [row["by_horizon"][h][key] for h in horizons]
            np.testing.assert_allclose(np.asarray(line.get_ydata(), float), want)
            np.testing.assert_allclose(
                [hi[1] - lo[1] for lo, hi in bars.get_segments()], [2 * row["by_horizon"][h][width] for h in horizons]
            )
    a_x, b_x = (np.asarray(c.lines[0].get_xdata(), float) for c in errors.containers)
    np.testing.assert_allclose((a_x + b_x) / 2, [1, 2, 3, 4, 5, 6])
    assert (b_x > a_x).all()
    assert "difference from A over the same scenarios" in diffs.get_title()
    plt.close(fig)
    # a single row has no reference: its panel alone
    fig = report_figure(rows[:1])
    assert len(fig.axes) == 1
    plt.close(fig)
    path = plot_report(rows, tmp_path / PLOT_FILE)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_report_csv_has_a_row_per_report_row_with_its_intervals_and_swept_values(report, tmp_path):
    """report.csv, for a spreadsheet or pandas: each row's metrics, their intervals and its paired
    difference, a column per swept key of a sweep's runs, as report.json holds them."""
    rows, per_scene = report
    add_intervals(rows, per_scene)
    rows[1].update(checkpoint="sweep/seed=1,lr=0.1/checkpoints/last.ckpt", values={"seed": "1", "lr": "0.1"})
    summary = pd.read_csv(write_reports(rows, per_scene, tmp_path)["summary"])
    assert list(summary.columns[:6]) == ["name", "checkpoint", "seed", "lr", "scenes", "trainable_params"]
    assert list(summary["name"]) == ["A", "B"] and list(summary["scenes"]) == [4, 5]
    a, b = summary.to_dict("records")
    assert all(pd.isna(a[key]) for key in ("checkpoint", "seed", "reference", "minFDE6_diff"))  # empty cells
    assert b["seed"] == 1 and b["lr"] == 0.1 and b["reference"] == "A" and b["checkpoint"] == rows[1]["checkpoint"]
    written = json.loads((tmp_path / "report.json").read_text())
    for m in METRICS:
        assert a[m] == pytest.approx(written[0][m]) and a[f"{m}_ci95"] == pytest.approx(written[0]["ci95"][m])
        assert b[f"{m}_diff"] == pytest.approx(written[1]["paired"]["diff"][m])
        assert b[f"{m}_diff_ci95"] == pytest.approx(written[1]["paired"]["ci95"][m])


def test_baselines_only_eval_compares_with_the_reference(synth_root, tmp_path, capsys):
    args = ["eval", f"data.root={synth_root}", "--out", str(tmp_path), "data.num_workers=0"]
    assert main(args + ["--reference", "kinematic_modes", "--plot"]) == 0
    said = capsys.readouterr().out
    assert f"{tmp_path / 'per_scenario.csv'}, {tmp_path / 'report.png'}\n" in said  # the reports' line
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"
    rows = json.loads((tmp_path / "report.json").read_text())
    cv, km, lane = rows
    assert "paired" not in km and cv["paired"]["reference"] == lane["paired"]["reference"] == "kinematic_modes"
    for row in (cv, lane):
        assert row["paired"]["scenes"] == row["scenes"]
        for m in METRICS:  # the same scenes: the mean difference is the difference of the means
            assert row["paired"]["diff"][m] == pytest.approx(row[m] - km[m], abs=1e-5)
    assert "Difference from kinematic_modes" in said


def test_unknown_reference_is_one_line_before_any_work(tmp_path, capsys):
    code = main(["eval", "--reference", "nope", f"data.root={tmp_path / 'missing'}"])
    err = capsys.readouterr().err
    assert code == 1 and "reference 'nope' is no row" in err and "constant_velocity, kinematic_modes" in err
    assert len(err.strip().splitlines()) == 1


def test_the_reference_may_be_named_by_its_checkpoint(tmp_path, monkeypatch):
    from forecast_peft.stages import _reference_row

    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "b").mkdir()
    monkeypatch.chdir(tmp_path)
    names, given = ["kinematic_modes", "peft (a)", "ft (b)"], ["runs/a", str(tmp_path / "runs" / "b")]
    assert _reference_row("b", names, given) == "ft (b)"  # the run's name
    assert _reference_row("runs/b/", names, given) == "ft (b)"  # the same folder, written otherwise
    assert _reference_row("./runs/a", names, given) == "peft (a)"

    names = ["constant_velocity", "peft (run-a)", "ft (run-b)"]
    checkpoints = ["runs/a/last.ckpt", "runs/b/best.ckpt"]
    assert _reference_row(None, names, checkpoints) is None
    assert _reference_row("runs/b/best.ckpt", names, checkpoints) == "ft (run-b)"
    assert _reference_row("peft (run-a)", names, checkpoints) == "peft (run-a)"
    assert _reference_row("constant_velocity", names, checkpoints) == "constant_velocity"
    # runs of one name in different folders (their rows named by path): the name alone is ambiguous
    names, checkpoints = ["peft (run-a)", "peft (elsewhere/run-a)"], ["runs/run-a", "elsewhere/run-a"]
    with pytest.raises(UserError, match=r"'run-a' names 2 rows \(peft \(run-a\), peft \(elsewhere/run-a\)\)"):
        _reference_row("run-a", names, checkpoints)
    assert _reference_row("elsewhere/run-a", names, checkpoints) == "peft (elsewhere/run-a)"


def test_each_run_of_a_sweep_against_its_own_reference(tmp_path):
    """--reference tpp_epochs=0: every run against the run of its other values without TPP."""
    from forecast_peft.errors import UserError
    from forecast_peft.stages import _reference_row

    runs = [
        "seed=1,tpp_epochs=0",
        "seed=1,tpp_epochs=4",
        "seed=2,tpp_epochs=0",
        "seed=2,tpp_epochs=4",
        "seed=3,tpp_epochs=4",
    ]
    checkpoints = [str(tmp_path / "sweep" / run) for run in runs]
    names = ["constant_velocity", *(f"peft ({run})" for run in runs)]
    pairs = _reference_row("tpp_epochs=0", names, checkpoints)
    assert pairs == {
        "peft (seed=1,tpp_epochs=0)": "peft (seed=1,tpp_epochs=0)",
        "peft (seed=1,tpp_epochs=4)": "peft (seed=1,tpp_epochs=0)",
        "peft (seed=2,tpp_epochs=0)": "peft (seed=2,tpp_epochs=0)",
        "peft (seed=2,tpp_epochs=4)": "peft (seed=2,tpp_epochs=0)",
        "peft (seed=3,tpp_epochs=4)": "peft (seed=3,tpp_epochs=4)",  # no seed=3 run without TPP
    }
    for missing in ("tpp_epochs=1", "lr=0"):
        with pytest.raises(UserError, match=f"reference '{missing}': no run of this report differs"):
            _reference_row(missing, names, checkpoints)

    # the report: one row per paired run, with its reference named; rows without one are not compared
    ids = ["s1", "s2"]
    per_scene = pd.concat([frame(name, ids, [10.0 + i, 10.0 + 2 * i]) for i, name in enumerate(names)])
    rows = [row(name, per_scene) for name in names]
    add_intervals(rows, per_scene, pairs)
    assert [r["name"] for r in rows if "paired" in r] == ["peft (seed=1,tpp_epochs=4)", "peft (seed=2,tpp_epochs=4)"]
    assert rows[2]["paired"]["diff"]["minFDE6"] == pytest.approx(1.5)  # s1: 12 - 11, s2: 14 - 12
    table = format_table(rows)
    assert "Difference from each row's reference over the same scenarios" in table
    assert "| peft (seed=2,tpp_epochs=4) | peft (seed=2,tpp_epochs=0) | " in table


def test_the_runs_of_a_sweep_averaged_over_their_seeds(tmp_path, capsys):
    """--over seed: each setting's mean over its seeds, with an interval across the runs (their
    own variation, which the per-row intervals over scenes leave out), and the mean of their
    paired differences."""
    from forecast_peft.reports import format_means, means_over

    ids = ["s1", "s2"]
    minfde6 = {  # per run: the two scenes' minFDE6
        "seed=1,tpp_epochs=0": [10.0, 12.0],
        "seed=2,tpp_epochs=0": [11.0, 11.0],
        "seed=3,tpp_epochs=0": [9.0, 13.0],
        "seed=1,tpp_epochs=4": [10.0, 13.0],
        "seed=2,tpp_epochs=4": [12.0, 12.0],
        "seed=3,tpp_epochs=4": [9.0, 16.0],
    }
    per_scene = pd.concat([frame(f"peft ({run})", ids, values) for run, values in minfde6.items()])
    per_scene = pd.concat([per_scene, frame("constant_velocity", ids, [20.0, 20.0])])
    rows = [row("constant_velocity", per_scene)]
    for run in minfde6:
        rows.append({**row(f"peft ({run})", per_scene), "values": dict(p.split("=") for p in run.split(","))})
    pairs = {f"peft ({run})": f"peft ({run.replace('tpp_epochs=4', 'tpp_epochs=0')})" for run in minfde6}
    add_intervals(rows, per_scene, pairs)
    groups = means_over(rows, "seed")
    assert [(g["values"], g["runs"]) for g in groups] == [
        ({"tpp_epochs": "0"}, [f"peft (seed={i},tpp_epochs=0)" for i in (1, 2, 3)]),
        ({"tpp_epochs": "4"}, [f"peft (seed={i},tpp_epochs=4)" for i in (1, 2, 3)]),
    ]
    # the runs' means: 11, 11, 11 without TPP; 11.5, 12, 12.5 with it (differences 0.5, 1, 1.5)
    assert groups[0]["mean"]["minFDE6"] == pytest.approx(11.0) and groups[0]["ci95"]["minFDE6"] == 0.0
    assert "diff" not in groups[0]  # its runs are their own references
    assert groups[1]["mean"]["minFDE6"] == pytest.approx(12.0) and groups[1]["diff"]["minFDE6"] == pytest.approx(1.0)
    assert groups[1]["ci95"]["minFDE6"] == pytest.approx(T95_2 * 0.5 / math.sqrt(3))  # sd of 11.5, 12, 12.5
    assert groups[1]["diff_ci95"]["minFDE6"] == pytest.approx(T95_2 * 0.5 / math.sqrt(3))
    assert groups[1]["reference"] == [f"peft (seed={i},tpp_epochs=0)" for i in (1, 2, 3)]
    table = format_means(groups)
    assert "| tpp_epochs=4 | 3 | " in table and f"| {12.0:.3f} ± {T95_2 * 0.5 / math.sqrt(3):.3f} |" in table
    assert f"+1.000 ± {T95_2 * 0.5 / math.sqrt(3):.3f}" in table.split("differences from their references")[1]
    assert means_over(rows, "lr") == [] and format_means([]) == ""
    paths = write_reports(rows, per_scene, tmp_path, means=groups)
    means = pd.read_csv(paths["means"])
    assert list(means["tpp_epochs"]) == [0, 4] and list(means["runs"]) == [3, 3] and set(means["over"]) == {"seed"}
    assert means["minFDE6_diff"].isna()[0] and means["minFDE6_diff"][1] == pytest.approx(1.0)
    assert "Mean over seed of each setting's runs" in paths["md"].read_text()
    assert "report_means.csv" not in {p.name for p in write_reports(rows, per_scene, tmp_path / "plain").values()}


def test_over_needs_the_runs_of_a_sweep_over_that_key(synth_root, tmp_path, capsys):
    from forecast_peft.stages import _check_over

    assert main(["eval", f"data.root={synth_root}", "--over", "seed", "--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == (
        "fpeft: error: --over seed averages the runs of a sweep, and no checkpoint is a sweep's run (a run directory "
        "named by its values, such as seed=1,tpp_epochs=4)"
    )
    sweep = [str(tmp_path / "lr" / f"seed={i},optim.lr=0.01") for i in (1, 2)]
    _check_over("seed", sweep)
    _check_over(None, [])
    with pytest.raises(UserError, match=r"^--over tpp_epochs: no checkpoint is a run of a sweep over tpp_epochs "):
        _check_over("tpp_epochs", [*sweep, str(tmp_path / "other")])
    with pytest.raises(UserError, match=r"\(their names give optim.lr, seed\)$"):
        _check_over("tpp_epochs", sweep)


def test_demo_verdict_needs_the_interval_to_exclude_zero():
    from forecast_peft.demo import verdict

    assert verdict(-2.3, 2.9) == "unclear"  # the demo's PEFT vs constant velocity at seed 2024
    assert verdict(-4.5, 2.5) == "better"
    assert verdict(0.6, 1.0) == "unclear"
    assert verdict(3.8, 1.9) == "worse"
    assert verdict(-5.0, None) == "unclear"  # one validation scene: no interval (half_width)
