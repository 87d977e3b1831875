"""``--scenarios FILE``: the scenarios eval scores and viz draws, read from a list or a CSV file."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from forecast_peft.cli import main
from forecast_peft.data.dataset import ForecastDataset
from forecast_peft.data.scenario_list import ScenarioList, _plain_csv_ids, read_scenario_list
from forecast_peft.errors import ConfigError, UserError, first_of


def test_a_list_is_read_from_lines_or_from_a_csv_files_scenario_id_column(tmp_path):
    lines = tmp_path / "ids.txt"
    lines.write_text("# the scenes constant velocity misses\nb\n\n a \nb\n")
    assert read_scenario_list(lines) == ScenarioList(lines, frozenset({"a", "b"}))
    report = tmp_path / "per_scenario.csv"  # a report's: a row per predictor and scenario
    pd.DataFrame({"name": ["cv", "cv", "peft"], "scenario_id": ["a", "c", "a"], "minFDE6": [1.0, 2.0, 3.0]}).to_csv(
        report, index=False
    )
    assert read_scenario_list(report).ids == {"a", "c"}
    column = tmp_path / "column.csv"
    column.write_text("scenario_id\nd\ne\n")
    assert read_scenario_list(column).ids == {"d", "e"}
    for text, problem in (
        ("name,minFDE6\ncv,1.0\n", "a CSV file without a scenario_id column (its columns: name, minFDE6)"),
        ("# nothing\n\n", "the file lists no scenario (one id per line, or a CSV file's scenario_id)"),
        ("scenario_id\n", "the file lists no scenario"),
        ('scenario_id,x\n"a,1\nb,2\n', "the file cannot be read (Error tokenizing data"),  # was pandas' traceback
    ):
        bad = tmp_path / "bad.txt"
        bad.write_text(text)
        with pytest.raises(
            UserError, match=r"^--scenarios .*bad.txt: " + problem.replace("(", r"\(").replace(")", r"\)")
        ):
            read_scenario_list(bad)
    with pytest.raises(UserError, match="nowhere.txt: the file does not exist$"):
        read_scenario_list(tmp_path / "nowhere.txt")


def test_a_list_is_read_from_a_submission_or_a_gzipped_forecast_table(tmp_path):
    """The scenario_id column of the files `fpeft eval --forecasts` takes: a parquet submission (a
    row per mode) and a `.csv.gz` or `.csv` table (a row per mode and step), each id once."""
    frame = pd.DataFrame({"scenario_id": ["a", "a", "b"], "track_id": ["1", "1", "2"], "probability": [0.5, 0.5, 1]})
    frame.to_parquet(tmp_path / "sub.parquet")
    frame.to_csv(tmp_path / "table.csv.gz", index=False)
    frame.to_csv(tmp_path / "table.csv", index=False)
    for name in ("sub.parquet", "table.csv.gz", "table.csv"):
        assert read_scenario_list(tmp_path / name) == ScenarioList(tmp_path / name, frozenset({"a", "b"}))
    frame.drop(columns="scenario_id").to_parquet(tmp_path / "other.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    for name, problem in (
        ("other.parquet", "a parquet file without a scenario_id column (its columns: track_id, probability)"),
        ("junk.parquet", "the file cannot be read ("),
        ("none.csv.gz", "the file does not exist"),
    ):
        with pytest.raises(UserError) as err:
            read_scenario_list(tmp_path / name)
        assert str(err.value).startswith(f"--scenarios {tmp_path / name}: {problem}")


def test_a_csv_files_ids_are_the_same_read_by_pyarrow_or_by_pandas_where_comments_need_it(tmp_path):
    """pyarrow reads a plain CSV file's scenario_id column (a forecast table's 9 million rows in a
    third of pandas' time); a file with ``#`` comments, which pyarrow would read as rows or stop
    at, goes to pandas' reader, which leaves them out: the same ids either way."""
    plain = tmp_path / "plain.csv"
    plain.write_text("name, scenario_id ,minFDE6\ncv,a,1.0\ncv, b ,2.0\npeft,a,3.0\n,,\n")
    assert _plain_csv_ids(plain) is not None
    assert read_scenario_list(plain).ids == {"a", "b"}
    for text in (
        "# hard ones, from run 7\nname,scenario_id,minFDE6\ncv,a,1.0\n",  # before the header
        "name,scenario_id,minFDE6\ncv,a,1.0\n# and,one,more\ncv,b,2.0\n",  # a row's commas
        "name,scenario_id,minFDE6\ncv,a,1.0\n# two\ncv,b,2.0  # worst\n",  # fewer fields; after a value
        "minFDE6,scenario_id\n1.0,a\n2.0,b # worst\n",  # after an id
    ):
        commented = tmp_path / "commented.csv"
        commented.write_text(text)
        assert _plain_csv_ids(commented) is None
        assert read_scenario_list(commented).ids == ({"a"} if "run 7" in text else {"a", "b"})


def test_the_dataset_keeps_the_listed_scenarios_and_names_those_it_lacks(synth_root, tmp_path):
    whole = ForecastDataset(synth_root / "cache", "val")
    ids = whole.scenario_ids()
    listed = ScenarioList(tmp_path / "ids.txt", frozenset(ids[3:8]))
    kept = ForecastDataset(synth_root / "cache", "val", scenarios=listed)
    assert kept.scenario_ids() == ids[3:8] and kept.total == 16 and kept.scenarios is listed
    where = f"the val split ({synth_root / 'cache' / 'val'})"
    with pytest.raises(ConfigError) as err:
        ForecastDataset(synth_root / "cache", "val", scenarios=ScenarioList(listed.path, listed.ids | {"x", "y"}))
    assert str(err.value) == f"--scenarios {listed.path}: 2 of its 7 scenarios are not in {where}: x and 1 other"
    with pytest.raises(ConfigError) as err:  # not a list of this split's scenarios at all: what the file should be
        ForecastDataset(synth_root / "cache", "val", scenarios=ScenarioList(listed.path, frozenset({"{"})))
    assert str(err.value) == (
        f"--scenarios {listed.path}: none of its 1 entries is a scenario of {where} ('{{'): give a file of one id "
        "per line, or a CSV file with a scenario_id column"
    )
    city_of = {i: whole[k]["city"] for k, i in enumerate(ids)}
    city = city_of[ids[3]]
    others = sorted(i for i in ids[3:8] if city_of[i] != city)
    assert others, "the test wants scenarios of two cities among the five"
    with pytest.raises(ConfigError) as err:
        ForecastDataset(synth_root / "cache", "val", cities=[city], scenarios=listed)
    assert str(err.value) == (
        f"--scenarios {listed.path}: {len(others)} of its 5 scenarios are in cities that data.cities=[{city}] "
        f"leaves out: {first_of(others)}"
    )
    mine = ScenarioList(listed.path, frozenset(i for i in ids[3:8] if city_of[i] == city))
    assert ForecastDataset(synth_root / "cache", "val", cities=[city], scenarios=mine).scenario_ids() == sorted(
        mine.ids, key=ids.index
    )


def test_eval_and_viz_take_the_scenarios_a_file_lists(synth_root, tmp_path, capsys):
    """Scored and drawn with the baselines alone: what a checkpoint adds is eval's and viz's own."""
    root, ids = synth_root, ForecastDataset(synth_root / "cache", "val").scenario_ids()
    listed = tmp_path / "hard.csv"
    pd.DataFrame({"scenario_id": ids[:5]}).to_csv(listed, index=False)
    out = tmp_path / "report"
    args = ["eval", f"data.root={root}", "baselines=[constant_velocity]", "--scenarios", str(listed), "--out", str(out)]
    assert main(args + ["data.num_workers=0"]) == 0
    assert json.loads((out / "report.json").read_text())[0]["scenes"] == 5
    assert set(pd.read_csv(out / "per_scenario.csv")["scenario_id"]) == set(ids[:5])
    assert f"(--scenarios {listed}: 5 of 16 scenarios)" in (out / "report.md").read_text()
    capsys.readouterr()
    pictures = tmp_path / "pics"
    args = ["viz", "--baseline", "constant_velocity", f"data.root={root}", "--scenarios", str(listed)]
    assert main(args + ["--select", "worst", "--num", "2", "--out", str(pictures), "data.num_workers=0"]) == 0
    drawn = sorted(p.name.split("_", 1)[1][:-4] for p in pictures.glob("*.png"))
    assert len(drawn) == 2 and set(drawn) <= set(ids[:5])
    assert "the worst of 5 scenarios" in capsys.readouterr().out
    assert main(args + ["--scenario", ids[0]]) == 1
    assert "--scenario draws one scenario, --scenarios FILE lists them" in capsys.readouterr().err
