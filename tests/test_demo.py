"""`fpeft demo` end to end at the smallest sizes: the README's first command runs every stage."""

import json

import pandas as pd
from omegaconf import OmegaConf

from forecast_peft.cli import main
from forecast_peft.demo import CONFIG_FILE, VERDICTS
from forecast_peft.evaluation import BASELINES
from forecast_peft.models.forecaster import TUNE_MODES

SMALL = [
    "demo.workers=1",
    "demo.pretrain_scenarios=16",
    "demo.tune_scenarios=8",
    "demo.val_scenarios=6",
    "demo.test_scenarios=2",
    "demo.pretrain_epochs=1",
    "demo.tune_epochs=1",
    "demo.val_every=1",
]


def test_the_demo_runs_every_stage_and_keeps_its_own_settings_beside_the_evaluations(tmp_path, capsys):
    run = tmp_path / "runs" / "demo"
    stale = run / "tune_ft" / "checkpoints" / "last.ckpt"  # an earlier demo's run: replaced, not trained on
    stale.parent.mkdir(parents=True)
    stale.write_text("an earlier demo's")
    assert main(["demo", f"demo.root={tmp_path / 'data'}", f"run_dir={run}", *SMALL]) == 0
    out = capsys.readouterr().out
    assert f"demo: starting over in {run} (the previous demo's runs are replaced)" in out
    # not a terminal: training's progress as lines (lit.progress.TrainingLines), no redrawn bar
    assert "epoch 0 done in " in out and ", val/minFDE6 " in out and "\r" not in out

    # its own settings and the evaluation's each in a file of their own
    own = OmegaConf.load(run / CONFIG_FILE)
    assert own.stage == "demo" and own.demo.tune_scenarios == 8 and own.run_dir == str(run)
    evaluated = OmegaConf.load(run / "config.yaml")
    assert evaluated.stage == "eval" and evaluated.data.root == str(tmp_path / "data" / "downtown")
    assert evaluated.run_dir == evaluated.out == str(run)  # where it wrote, not a time-stamped folder it never made

    models = [f"tune_{mode}" for mode in TUNE_MODES]
    for name in ("pretrain", *models):
        assert (run / name / "checkpoints" / "last.ckpt").is_file(), name
    # pre-training and each tuning mode at its own learning rate (PEFT's and FT's differ from the others)
    assert OmegaConf.load(run / "pretrain" / "config.yaml").optim.lr == own.demo.pretrain_lr
    for mode in TUNE_MODES:
        assert OmegaConf.load(run / f"tune_{mode}" / "config.yaml").optim.lr == own.demo.tune_lr[mode], mode
    assert own.demo.tune_lr.peft != own.demo.pretrain_lr
    assert stale.read_bytes() != b"an earlier demo's"
    rows = json.loads((run / "report.json").read_text())
    names = [r["name"] for r in rows]
    baselines = [n for n in names if n in BASELINES]
    assert baselines and len(names) == len(baselines) + len(TUNE_MODES)
    assert all(r["scenes"] == 6 for r in rows)
    assert len(pd.read_csv(run / "per_scenario.csv")) == 6 * len(rows)
    assert len(pd.read_parquet(run / "submission.parquet").scenario_id.unique()) == 2
    assert any((run / "pictures").iterdir())
    assert (run / "report.png").read_bytes()[:4] == b"\x89PNG"  # eval's plot=true

    summary = json.loads((run / "demo_summary.json").read_text())
    assert set(summary) == {f"vs_{b}" for b in baselines} | {"seconds"}
    for base in baselines:
        compared = summary[f"vs_{base}"]
        assert len(compared) == len(TUNE_MODES)
        for model, c in compared.items():
            assert c["verdict"] in VERDICTS and c["ci95"] > 0
            assert f"  {model}: {VERDICTS[c['verdict']]} {base} on minFDE6" in out
