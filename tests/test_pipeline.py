"""End to end on a small synthetic dataset: every stage through its CLI or stage function."""

import collections
import importlib.util
import json
import multiprocessing
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from forecast_peft import config, stages
from forecast_peft.cli import main
from forecast_peft.constants import MANOEUVRES, METRICS, OBJECT_TYPES
from forecast_peft.data.dataset import ForecastDataset
from forecast_peft.evaluation import focal_manoeuvres
from tests.conftest import TINY, rounded_slots

# tensorboard=true's logs, read here with tensorboardX's protocol buffers: a package of the dev
# extra, which `make test-min-deps` does not install (those checks are left out there)
TENSORBOARD = ["tensorboard=true"] if importlib.util.find_spec("tensorboardX") else []


@pytest.fixture(scope="module")
def tuned(pretrained_ckpt, synth_root, tmp_path_factory):
    out = {}
    for mode in ("peft", "ft", "baseline"):
        run = tmp_path_factory.mktemp(mode)
        extra = ["tpp_epochs=1"] if mode == "peft" else []
        cfg = config.compose(
            "tune",
            TINY
            + extra
            + [
                f"data.root={synth_root}",
                f"mode={mode}",
                f"pretrained={pretrained_ckpt}",
                "trainer.max_epochs=1",
                f"run_dir={run}",
            ],
        )
        out[mode] = stages.tune(cfg)
    return out


def test_training_compiles_in_the_mode_asked_target_parameter_pretraining_too(
    pretrained_ckpt, synth_root, tmp_path, monkeypatch, capsys
):
    """compile=true / compile_mode= compile what a training stage fits, the target-parameter
    pre-training's network as well (it ran uncompiled); the modes that record CUDA graphs, which
    training's ever-changing batch shapes would re-record at every step, are refused before any
    work."""
    from forecast_peft.models import compile as compile_module

    compiled = []
    monkeypatch.setattr(
        compile_module, "maybe_compile", lambda model, on, mode=None: compiled.append((type(model).__name__, on, mode))
    )
    base = [*TINY, f"data.root={synth_root}", "trainer.max_epochs=1", "trainer.limit_train_batches=1"]
    tpp = ["tune", "--mode", "peft", "--pretrained", str(pretrained_ckpt), "--tpp-epochs", "1"]
    autotune = "compile_mode=max-autotune-no-cudagraphs"
    assert main([*tpp, *base, autotune, f"run_dir={tmp_path / 't'}"]) == 0
    # on the CPU the autotuning modes compile as the default one (their CPU templates fail at a
    # second batch size), and say so
    assert compiled == [("MAEModel", True, "default"), ("PromptForecaster", True, "default")]
    note = "note: compile_mode=max-autotune-no-cudagraphs tunes GPU kernels; on cpu it compiles as compile=true"
    assert capsys.readouterr().err.count(note) == 2
    compiled.clear()
    monkeypatch.setattr(compile_module, "training_device_type", lambda trainer: "cuda")  # as on a GPU
    assert main(["pretrain", *base, autotune, f"run_dir={tmp_path / 'g'}"]) == 0
    assert compiled == [("MAEModel", True, "max-autotune-no-cudagraphs")] and note not in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setattr(
        compile_module, "maybe_compile", lambda model, on, mode=None: compiled.append((type(model).__name__, on, mode))
    )
    compiled.clear()
    assert main(["pretrain", *base, "compile=true", f"run_dir={tmp_path / 'p'}"]) == 0
    assert main(["tune", "--mode", "ft", *base, f"run_dir={tmp_path / 'f'}"]) == 0
    assert compiled == [("MAEModel", True, "default"), ("PromptForecaster", False, None)]
    capsys.readouterr()
    for stage in ("tune", "pretrain"):
        for mode in ("reduce-overhead", "max-autotune"):
            assert main([stage, *base, f"compile_mode={mode}", f"run_dir={tmp_path / 'x'}"]) == 2
            err = capsys.readouterr().err
            assert f"compile_mode={mode} records a CUDA graph per batch shape, and training batches" in err
    assert main(["pretrain", *base, "compile_mode=fast", f"run_dir={tmp_path / 'x'}"]) == 2
    assert "compile_mode must be one of default, max-autotune-no-cudagraphs, " in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_attention_kernel_setting_holds_every_stage_network_and_fails_early_where_the_device_lacks_it(
    pretrained_ckpt, tuned, synth_root, tmp_path, monkeypatch, capsys
):
    """attention_kernel= holds the transformer attention of the network a stage runs (training,
    the target-parameter pre-training's network too, and eval's) to one kernel, with eval's
    report the default kernel's; a kernel only CUDA has is refused on the CPU before any work,
    and so is an unknown name."""
    from forecast_peft.models import compile as compile_module
    from forecast_peft.models.layers import SelfAttention

    held = []

    def record(model, on, mode=None):
        held.append((type(model).__name__, {m.kernel for m in model.modules() if isinstance(m, SelfAttention)}))

    monkeypatch.setattr(compile_module, "maybe_compile", record)
    base = [*TINY, f"data.root={synth_root}", "trainer.max_epochs=1", "trainer.limit_train_batches=1"]
    tpp = ["tune", "--mode", "peft", "--pretrained", str(pretrained_ckpt), "--tpp-epochs", "1"]
    assert main([*tpp, *base, "attention_kernel=math", f"run_dir={tmp_path / 't'}"]) == 0
    assert held == [("MAEModel", {"math"}), ("PromptForecaster", {"math"})]
    held.clear()
    assert main(["pretrain", *base, f"run_dir={tmp_path / 'p'}"]) == 0
    assert held == [("MAEModel", {"auto"})]
    capsys.readouterr()
    for stage in ("tune", "pretrain"):
        assert main([stage, *base, "attention_kernel=varlen", f"run_dir={tmp_path / 'x'}"]) == 2
        assert "attention_kernel=varlen runs on a CUDA device only, and this run is on cpu" in capsys.readouterr().err
    assert main(["pretrain", *base, "attention_kernel=flash", f"run_dir={tmp_path / 'x'}"]) == 2
    assert "attention_kernel must be one of auto, cudnn, efficient, math, flex, varlen, got 'flash'" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "x").exists()
    # as on a GPU: accepted, and held (this CPU then runs varlen's stand-in on the tiny batches)
    monkeypatch.setattr(compile_module, "training_device_type", lambda trainer: "cuda")
    held.clear()
    assert main(["pretrain", *base, "attention_kernel=varlen", f"run_dir={tmp_path / 'g'}"]) == 0
    assert held == [("MAEModel", {"varlen"})]
    monkeypatch.undo()

    # flex_attention is fused only by the compiler: uncompiled, a note says it runs slowly
    cfg = OmegaConf.create({"attention_kernel": "flex"})
    for compiled in (False, True):
        assert stages.attention_kernel(cfg, "cuda", compiled) == "flex"
        assert ("attention_kernel=flex is fast only in a compiled network" in capsys.readouterr().err) != compiled

    args = ["eval", "-c", tuned["peft"]["last"], f"data.root={synth_root}", "data.num_workers=0", "baselines=[]"]
    reports = {}
    for kernel in ("auto", "math"):
        assert main([*args, f"attention_kernel={kernel}", "--out", str(tmp_path / kernel)]) == 0
        reports[kernel] = json.loads((tmp_path / kernel / "report.json").read_text())
    for plain, math in zip(reports["auto"], reports["math"], strict=True):
        for metric in METRICS:
            assert math[metric] == pytest.approx(plain[metric], rel=1e-5), metric
    capsys.readouterr()
    for stage_args in (args, ["predict", "-c", tuned["peft"]["last"], f"data.root={synth_root}"]):
        out = tmp_path / "refused"
        assert main([*stage_args, "device=cpu", "attention_kernel=cudnn", "--out", str(out)]) == 2
        assert "attention_kernel=cudnn runs on a CUDA device only, and this run is on cpu" in capsys.readouterr().err
        assert not out.exists()


def test_peft_without_pretrained_backbone_warns(synth_root, tmp_path, capsys):
    overrides = TINY + [f"data.root={synth_root}", "mode=peft", "trainer.fast_dev_run=true", f"run_dir={tmp_path}"]
    stages.tune(config.compose("tune", overrides))
    assert "warning: --mode peft without --pretrained" in capsys.readouterr().err


def test_tune_writes_checkpoints_and_logs(tuned, pretrained_ckpt):
    logs = {
        "pretrain": Path(pretrained_ckpt).parents[1] / "logs",
        "tpp": Path(tuned["peft"]["run_dir"]) / "tpp" / "logs",
    }
    for mode, res in tuned.items():
        assert res["best"].endswith(".ckpt") and res["last"].endswith("last.ckpt")
        metrics = pd.read_csv(f"{res['run_dir']}/logs/metrics.csv")
        assert metrics["val/minFDE6"].notna().any(), mode
        logs[mode] = Path(res["run_dir"]) / "logs"
    for stage, folder in logs.items():
        # every epoch's mean training loss, whatever trainer.log_every_n_steps is (one epoch each)
        metrics = pd.read_csv(folder / "metrics.csv")
        assert metrics["train/epoch_loss"].notna().sum() == 1, stage
        assert metrics["train/epoch_loss"].dropna().gt(0).all(), stage


def test_eval_reports(tuned, synth_root, tmp_path, capsys):
    args = ["eval", f"data.root={synth_root}", "--out", str(tmp_path), "data.num_workers=0"]
    for res in tuned.values():
        args += ["--checkpoint", res["best"]]
    assert main(args) == 0
    rows = json.loads((tmp_path / "report.json").read_text())
    names = [r["name"].split(" ")[0] for r in rows]
    assert names == ["constant_velocity", "kinematic_modes", "lane_following", "peft", "ft", "baseline"]
    for i, row in enumerate(rows):
        assert row["scenes"] == 16
        assert set(row) == {
            "name",
            "minADE1",
            "minFDE1",
            "minADE6",
            "minFDE6",
            "MR6",
            "brier-minFDE6",
            "scenes",
            "trainable_params",
            "ci95",
            "unscored",
            "by_focal_type",
            "by_manoeuvre",
            "by_city",
            "by_horizon",
            "top_modes",
            "top_is_best",
        } | ({"paired"} if i else set()) | ({"chosen_on_this_split", "checkpoint", "settings"} if i >= 3 else set())
        assert row.get("chosen_on_this_split", True)  # every tuned row: its run's best, chosen on this split
        for groups in (row["by_focal_type"], row["by_manoeuvre"], row["by_city"]):
            assert sum(group["scenes"] for group in groups.values()) == 16
            by_group = sum(group["scenes"] * group["minFDE6"] for group in groups.values()) / 16
            assert by_group == pytest.approx(row["minFDE6"], rel=1e-5)
        assert row["unscored"] == 0
        assert row["minFDE6"] <= row["minFDE1"] + 1e-6
        if i:  # against the first row, constant velocity, on the same 16 scenes
            assert row["paired"]["reference"] == "constant_velocity" and row["paired"]["scenes"] == 16
            assert row["paired"]["diff"]["minFDE6"] == pytest.approx(row["minFDE6"] - rows[0]["minFDE6"], abs=1e-5)
    assert rows[3]["trainable_params"] < rows[4]["trainable_params"]  # peft < ft
    # what the runs' settings differ in, besides the mode (the row's name): PEFT's target-parameter pre-training
    assert [row["settings"] for row in rows[3:]] == [{"tpp_epochs": 1}, {"tpp_epochs": 0}, {"tpp_epochs": 0}]
    per_scene = pd.read_csv(tmp_path / "per_scenario.csv")
    assert len(per_scene) == 6 * 16
    # the modes each scene's metrics scored: K=1 the most probable, K=6 the nearest the endpoint
    assert per_scene["top_mode"].between(0, 5).all() and per_scene["best_mode"].between(0, 5).all()
    assert per_scene["top_prob"].between(1 / 6 - 1e-6, 1).all()
    same = per_scene["top_mode"] == per_scene["best_mode"]
    np.testing.assert_allclose(per_scene["minFDE1"][same], per_scene["minFDE6"][same])
    assert (per_scene["minFDE1"][~same] >= per_scene["minFDE6"][~same]).all()
    for row in rows:
        mine = per_scene[per_scene["name"] == row["name"]]
        assert sum(row["top_modes"].values()) == 16 and row["top_is_best"] == pytest.approx(same[mine.index].mean())
        # minFDE6 by horizon: each the mean of its per-scenario column, at 6 s minFDE6 itself
        horizons = row["by_horizon"]
        assert [horizons[f"{t}s"]["minFDE6"] for t in range(1, 6)] == pytest.approx(
            [mine[f"minFDE6_{t}s"].mean() for t in range(1, 6)], rel=1e-5
        )
        assert horizons["6s"]["minFDE6"] == pytest.approx(row["minFDE6"], rel=1e-6)
        assert horizons["1s"]["minFDE6"] < row["minFDE6"]
    val = ForecastDataset(synth_root / "cache", "val")  # the focal agent's type, read from the cache
    focal = val.__getitems__(list(range(len(val))))
    kinds = dict(zip(focal["scenario_id"], (OBJECT_TYPES[int(t)] for t in focal["x_attr"][:, 0, 0])))
    assert (per_scene["focal_type"] == per_scene["scenario_id"].map(kinds)).all()
    assert (per_scene["city"] == per_scene["scenario_id"].map(dict(zip(focal["scenario_id"], focal["city"])))).all()
    assert len(rows[0]["by_city"]) > 1
    manoeuvres = dict(zip(focal["scenario_id"], (MANOEUVRES[k] for k in focal_manoeuvres(focal).tolist())))
    assert (per_scene["manoeuvre"] == per_scene["scenario_id"].map(manoeuvres)).all()
    np.testing.assert_allclose(
        per_scene.groupby("name", sort=False)["minFDE6"].mean().to_numpy(), [r["minFDE6"] for r in rows], rtol=1e-5
    )
    from forecast_peft.provenance import command

    environment = json.loads((tmp_path / "environment.json").read_text())  # what the numbers came from
    assert environment["command"] == command() and environment["hardware"]["precision"] == "32"
    assert environment["software"]["forecast_peft"] and environment["hardware"]["device"].startswith("cpu: ")
    last = (tmp_path / "report.md").read_text().splitlines()[-1]  # and in words, under the tables
    assert last.startswith(
        f"Scored on split 'val' of {synth_root} with forecast-peft {environment['software']['forecast_peft']}"
    )
    assert last.endswith(f", {environment['hardware']['device']}, precision 32, {environment['written']}.")
    out = capsys.readouterr().out
    assert "| constant_velocity |" in out and "Optimistic: peft (" in out and "were chosen as best checkpoints" in out
    assert "minFDE6 / MR6 by city (scenes):" in out
    settings = "; ".join(f"{row['name']}: tpp_epochs={row['settings']['tpp_epochs']}" for row in rows[3:])
    assert f"Settings in which the checkpoints' runs differ (how they ran left out): {settings}." in out


def test_runs_lists_training_runs(tuned, pretrained_ckpt, synth_root, tmp_path, capsys):
    import fcntl

    root = tmp_path / "runs"
    shutil.copytree(tuned["ft"]["run_dir"], root / "tune" / "a")
    shutil.copytree(Path(pretrained_ckpt).parents[1], root / "pretrain" / "b")
    (root / "eval").mkdir()
    OmegaConf.save(OmegaConf.create({"stage": "eval"}), root / "eval" / "config.yaml")  # not a training run
    (root / "broken").mkdir()
    (root / "broken" / "config.yaml").write_text("stage: [unclosed")
    (root / "pretrain" / "b" / "checkpoints" / "last.ckpt").unlink()
    # one epoch of two: stopped early, interrupted, still running (another process holds its lock),
    # and a run of an older version without a lock file, which cannot tell the last two apart
    for name in ("stopped", "cut", "going", "old"):
        shutil.copytree(root / "tune" / "a", root / "tune" / name)
        config_yaml = root / "tune" / name / "config.yaml"
        config_yaml.write_text(config_yaml.read_text().replace("max_epochs: 1\n", "max_epochs: 2\n"))
        if name != "stopped":
            (root / "tune" / name / "finished.json").unlink()
    config_yaml = root / "tune" / "cut" / "config.yaml"
    saved = config_yaml.read_text()
    assert "  cities: []\n" in saved
    saved = saved.replace("train_fraction: 1.0\n", "train_fraction: 0.25\n")
    config_yaml.write_text(saved.replace("  cities: []\n", "  cities: [miami, austin]\n"))
    (root / "tune" / "old" / config.RUN_LOCK).unlink()
    going = open(root / "tune" / "going" / config.RUN_LOCK, "w")
    fcntl.flock(going, fcntl.LOCK_EX)
    going.write("4242")
    going.flush()
    assert main(["runs", str(root)]) == 0
    going.close()
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.startswith(f"| {root}")]
    assert len(lines) == 6
    assert lines[2].startswith(f"| {root / 'tune' / 'cut'} |") and "| 1/2 (interrupted) |" in lines[2]
    assert lines[3].startswith(f"| {root / 'tune' / 'going'} |") and "| 1/2 (running: pid 4242) |" in lines[3]
    assert "| 1/2 (unfinished: running, or interrupted) |" in lines[4]
    assert f"| {synth_root} (cities [miami,austin], 0.25 of train) |" in lines[2] and f"| {synth_root} |" in lines[5]
    assert lines[5].startswith(f"| {root / 'tune' / 'stopped'} |") and "| 1/2 (stopped early) |" in lines[5]
    best = pd.read_csv(root / "tune" / "a" / "logs" / "metrics.csv")["val/minFDE6"].min()
    assert lines[0].startswith(f"| {root / 'pretrain' / 'b'} | pretrain | tiny |") and "1/1 (no checkpoint)" in lines[0]
    assert lines[1].startswith(f"| {root / 'tune' / 'a'} | tune ft | tiny |") and "| 1/1 |" in lines[1]
    assert f"| {best:.3f} val/minFDE6 | 0 | {best:.3f} |" in lines[1]
    assert f"skipped {root / 'broken' / 'config.yaml'}: not readable YAML" in captured.err
    assert main(["runs", str(root / "eval")]) == 0 and "no pre-training or tuning runs" in capsys.readouterr().out
    from forecast_peft.runs import sort_runs

    rows = [{"stage": "tune ft", "best": 3.0}, {"stage": "pretrain", "best": 9.0}, {"stage": "tune ft", "best": None}]
    rows.append({"stage": "tune ft", "best": 1.0})
    assert [r["best"] for r in sort_runs(rows, "best")] == [9.0, 1.0, 3.0, None]
    assert main(["runs", str(root), "--sort", "worst"]) == 1 and "unknown --sort 'worst'" in capsys.readouterr().err
    assert main(["runs", str(root / "nowhere")]) == 1 and "nowhere does not exist" in capsys.readouterr().err
    assert main(["runs", str(root / "broken" / "config.yaml")]) == 1
    assert "config.yaml is a file, not a folder of runs" in capsys.readouterr().err


def _copy_run(run, to: Path, settings: dict) -> None:
    """A copy of the run directory ``run`` whose config.yaml says ``settings`` (dotted keys)."""
    shutil.copytree(run, to)
    saved = OmegaConf.load(to / "config.yaml")
    for key, value in settings.items():
        OmegaConf.update(saved, key, value)
    OmegaConf.save(saved, to / "config.yaml")


def test_runs_says_in_which_settings_the_runs_beside_each_other_differ(tuned, tmp_path, capsys):
    """Runs in time-stamped folders told nothing of their settings: a last column gives each run's
    values of those that differ between the runs of its stage in its folder, less those the other
    columns show, those that change how it ran but not what it learnt (workers), and those its
    folder's name gives (a sweep's)."""
    root = tmp_path / "runs"
    edits = {
        "2026-01-01_10-00-00": {},
        "2026-01-01_11-00-00": {"optim.lr": 0.0123, "data.num_workers": 7, "model.peft.num_prompts": 7},
        "seed=9": {"seed": 9, "optim.lr": 0.0123},
    }
    for name, values in edits.items():
        _copy_run(tuned["ft"]["run_dir"], root / "tune" / name, values)
    shutil.copytree(tuned["ft"]["run_dir"], root / "elsewhere" / "z")  # another folder: not compared
    assert main(["runs", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("| last | settings |")
    cells = {line.split(" | ")[0][2:]: line.split(" | ")[-1].rstrip(" |") for line in lines[2:]}
    base = OmegaConf.load(root / "tune" / "2026-01-01_10-00-00" / "config.yaml")
    prompts = f"model.peft.num_prompts={base.model.peft.num_prompts}"
    assert cells == {
        str(root / "elsewhere" / "z"): "-",
        str(root / "tune" / "2026-01-01_10-00-00"): f"seed={base.seed} {prompts} optim.lr={base.optim.lr:g}",
        str(root / "tune" / "2026-01-01_11-00-00"): f"seed={base.seed} model.peft.num_prompts=7 optim.lr=0.0123",
        str(root / "tune" / "seed=9"): f"{prompts} optim.lr=0.0123",
    }
    # one folder of runs alike but for what their names say (a sweep's): no column
    assert main(["runs", str(root / "elsewhere")]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("| last |")
    from forecast_peft.runs import MAX_SETTINGS, settings_text

    many = {f"optim.k{j}": j / 4 for j in range(MAX_SETTINGS + 2)} | {"pretrained": "p/b/checkpoints/last.ckpt"}
    assert settings_text(many) == " ".join(f"optim.k{j}={j / 4:g}" for j in range(MAX_SETTINGS)) + " (+3 more)"
    assert (
        settings_text({"pretrained": "p/b/checkpoints/last.ckpt", "model.x": [1, 2.5]})
        == "pretrained=p/b model.x=[1,2.5]"
    )


def test_eval_names_the_settings_its_checkpoints_runs_differ_in(tuned, synth_root, tmp_path, capsys):
    """Runs in folders anywhere, side by side in a report: each checkpoint's row says its run's
    values of the settings in which they differ (how they ran left out; a sweep run's values are
    in its name); a run whose config.yaml is damaged still scores, without them."""
    runs = {name: tmp_path / folder / name for name, folder in (("a", "x"), ("b", "y"), ("seed=5", "z"), ("c", "w"))}
    edits = {"b": {"optim.lr": 0.0123, "data.num_workers": 7}, "seed=5": {"seed": 5}}
    for name, run in runs.items():
        _copy_run(tuned["ft"]["run_dir"], run, edits.get(name, {}))
    (runs["c"] / "config.yaml").write_text("stage: [unclosed")
    args = ["eval", f"data.root={synth_root}", "--out", str(tmp_path / "r"), "data.num_workers=0", "baselines=[]"]
    assert main(args + [w for run in runs.values() for w in ("-c", str(run))]) == 0
    rows = json.loads((tmp_path / "r" / "report.json").read_text())
    base = OmegaConf.load(runs["a"] / "config.yaml")
    assert [row.get("settings") for row in rows] == [
        {"seed": base.seed, "optim.lr": base.optim.lr},
        {"seed": base.seed, "optim.lr": 0.0123},
        {"optim.lr": base.optim.lr},
        None,
    ]
    note = f"ft (a): seed={base.seed} optim.lr={base.optim.lr:g}; ft (b): seed={base.seed} optim.lr=0.0123; "
    assert note + f"ft (seed=5): optim.lr={base.optim.lr:g}." in capsys.readouterr().out
    assert note in (tmp_path / "r" / "report.md").read_text()


def test_runs_plots_the_learning_curves_of_what_they_logged(tuned, pretrained_ckpt, tmp_path, capsys, monkeypatch):
    """--plot draws a row per stage (pre-training, tuning): each run's mean training loss and
    monitored validation value by epoch, as its metrics.csv logged them."""
    from matplotlib.figure import Figure

    root = tmp_path / "runs"
    for mode in ("peft", "ft"):
        shutil.copytree(tuned[mode]["run_dir"], root / mode)
    shutil.copytree(Path(pretrained_ckpt).parents[1], root / "pre")
    drawn, save = {}, Figure.savefig

    def savefig(fig, path, *args, **kwargs):
        for ax in fig.axes:
            drawn[ax.get_title()] = {
                line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines
            }
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    assert main(["runs", str(root), "--plot", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip().endswith(f"learning curves: {tmp_path / 'learning_curves.png'}")
    assert (tmp_path / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(drawn) == [
        "pretrain: training loss (mean of each epoch)",
        "pretrain: val/loss (validation)",
        "tune: training loss (mean of each epoch)",
        "tune: val/minFDE6 (validation)",
    ]
    for stage, run, monitor in (
        ("pretrain", "pre", "val/loss"),
        ("tune", "peft", "val/minFDE6"),
        ("tune", "ft", "val/minFDE6"),
    ):
        log = pd.read_csv(root / run / "logs" / "metrics.csv")
        for title, key in (
            (f"{stage}: training loss (mean of each epoch)", "train/epoch_loss"),
            (f"{stage}: {monitor} (validation)", monitor),
        ):
            want = log.dropna(subset=[key])
            ((label, (epochs, values)),) = [(k, v) for k, v in drawn[title].items() if k.startswith(f"{run} (")]
            assert epochs == list(want["epoch"]) and len(epochs) > 0
            np.testing.assert_allclose(values, want[key].to_numpy())


def test_a_best_checkpoint_is_flagged_where_it_was_chosen(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("best-epoch003.ckpt", "last.ckpt"):
        (run / "checkpoints" / name).touch()
    (run / "adapter").mkdir()
    OmegaConf.save(
        OmegaConf.create({"stage": "tune", "data": {"cache_dir": str(tmp_path / "cache")}}), run / "config.yaml"
    )
    here = OmegaConf.create({"split": "val", "data": {"cache_dir": str(tmp_path / "cache")}})
    best = run / "checkpoints" / "best-epoch003.ckpt"
    assert stages.chosen_on(best, here) and stages.chosen_on(run / "adapter", here)
    assert not stages.chosen_on(run / "checkpoints" / "last.ckpt", here) and not stages.chosen_on(run, here)
    assert not stages.chosen_on(best, OmegaConf.merge(here, {"split": "train"}))
    assert not stages.chosen_on(best, OmegaConf.merge(here, {"data": {"cache_dir": str(tmp_path / "other")}}))


def test_eval_rows_are_distinct_and_each_checkpoint_is_scored_once(tuned, synth_root, tmp_path, capsys):
    """The same checkpoint given twice (a run directory and its last.ckpt) made two rows of one
    name, and two runs of one name in different folders rows that shared a name too: the report
    then paired each such row with 2 x 16 scenes. Each file is scored once, and rows of runs of
    one name are told apart by their path."""
    import shutil

    run = Path(tuned["peft"]["run_dir"])
    twin = tmp_path / "elsewhere" / run.name  # another run of the same name
    shutil.copytree(run, twin)
    given = [run, run / "checkpoints" / "last.ckpt", run, tuned["peft"]["best"], twin]
    args = ["eval", f"data.root={synth_root}", "--out", str(tmp_path / "out"), "data.num_workers=0"]
    assert main(args + [f"--checkpoint={path}" for path in given]) == 0
    out = capsys.readouterr().out
    assert (
        f"note: -c {given[1]} is the checkpoint of -c {run} ({run / 'checkpoints' / 'last.ckpt'}): scored once" in out
    )
    assert f"note: -c {run} is given twice: scored once" in out
    rows = json.loads((tmp_path / "out" / "report.json").read_text())
    best = Path(tuned["peft"]["best"]).name
    assert [r["name"] for r in rows[3:]] == [f"peft ({run.name})", f"peft ({run.name}: {best})", f"peft ({twin})"]
    assert all(r["paired"]["scenes"] == 16 for r in rows[1:])
    assert len(pd.read_csv(tmp_path / "out" / "per_scenario.csv")) == 6 * 16


def test_eval_in_bf16_is_within_one_percent_of_fp32(tuned, synth_root, tmp_path):
    rows = {}
    for precision in ("32", "bf16"):
        out = tmp_path / precision
        args = ["eval", "-c", tuned["peft"]["best"], f"data.root={synth_root}", "--out", str(out)]
        assert main(args + ["--precision", precision, "data.num_workers=0"]) == 0
        (rows[precision],) = [r for r in json.loads((out / "report.json").read_text()) if r["name"].startswith("peft")]
    assert rows["32"]["scenes"] == rows["bf16"]["scenes"] == 16
    assert rows["bf16"]["minFDE6"] != rows["32"]["minFDE6"]  # bf16 did run
    assert abs(rows["bf16"]["minFDE6"] / rows["32"]["minFDE6"] - 1) < 0.01


def test_eval_runs_peft_with_its_adapters_folded_in_and_scores_the_same(tuned, synth_root, tmp_path, monkeypatch):
    """``fpeft eval`` runs a PEFT model with its adapters folded into the layers beside them (fewer,
    larger kernels) and scores every scene as the tuned model itself, adapters as layers of their
    own, scores it."""
    from forecast_peft import evaluation
    from forecast_peft.models.layers import SelfAttention
    from forecast_peft.peft.modules import Adapter

    ckpt = tuned["peft"]["best"]
    real_predictor, networks = evaluation.model_predictor, []

    def spying(model, *args, **kwargs):
        networks.append(model)
        return real_predictor(model, *args, **kwargs)

    monkeypatch.setattr(evaluation, "model_predictor", spying)
    frames = []
    for folded in (True, False):
        if not folded:  # the network eval ran until session 25: the tuned model as it is
            monkeypatch.setattr(evaluation, "inference_network", lambda model, mode=None, kernel="auto": model)
        out = tmp_path / str(folded)
        args = ["eval", "-c", ckpt, f"data.root={synth_root}", "--out", str(out), "data.num_workers=0", "baselines=[]"]
        assert main(args) == 0
        frames.append(pd.read_csv(out / "per_scenario.csv").sort_values("scenario_id", ignore_index=True))
    folded_net, tuned_net = networks
    assert not any(isinstance(m, Adapter) for m in folded_net.modules())
    assert all(m.folded > 0 for m in folded_net.modules() if isinstance(m, SelfAttention))
    assert any(isinstance(m, Adapter) for m in tuned_net.modules())
    assert len(frames[0]) == 16 and frames[0]["scenario_id"].equals(frames[1]["scenario_id"])
    for metric in ("minADE6", "minFDE6", "minFDE1", "brier-minFDE6"):
        np.testing.assert_allclose(frames[0][metric], frames[1][metric], rtol=1e-5, atol=1e-5)


def test_the_bf16_check_scores_a_tuned_checkpoint_as_eval_does(tuned, synth_root, tmp_path, monkeypatch):
    from benchmarks import check_bf16

    ckpt = tuned["peft"]["best"]
    out = tmp_path / "bf16.json"
    argv = ["check_bf16.py", "--checkpoint", str(ckpt), "--cache", str(synth_root / "cache"), "--batch", "5"]
    monkeypatch.setattr(sys, "argv", argv + ["--out", str(out)])
    check_bf16.main()
    report = json.loads(out.read_text())
    evaluated = tmp_path / "eval"
    assert main(["eval", "-c", ckpt, f"data.root={synth_root}", "--out", str(evaluated), "data.num_workers=0"]) == 0
    (row,) = [r for r in json.loads((evaluated / "report.json").read_text()) if r["name"].startswith("peft")]
    assert report["scenes"] == row["scenes"] == 16  # every scene of val, in batches of 5
    assert report["fp32"]["minFDE6"] == pytest.approx(row["minFDE6"], rel=1e-5)  # the same model and scenes
    assert report["fp32"]["MR6"] == pytest.approx(row["MR6"])
    assert 0 < report["endpoint_shift_mean_m"] <= report["endpoint_shift_max_m"] < 1.0  # bf16 ran; centimetres
    relative = abs(report["bf16"]["minFDE6"] - report["fp32"]["minFDE6"]) / report["fp32"]["minFDE6"]
    assert report["minFDE6_rel_diff"] == pytest.approx(relative) and relative < 0.01
    # its batches are collated as eval's loader collates them: slots rounded up to data.slot_multiple
    assert report["slot_multiple"] == 8
    rounded, plain = (list(check_bf16.cached_batches(synth_root / "cache", "val", 5, k)) for k in (8, 1))
    assert len(rounded_slots(rounded, plain, 8)) == 4

    # --compile --attention-kernel K: the bf16 pass on the fast path, against the plain fp32 one
    from forecast_peft.models import compile as compile_module
    from forecast_peft.models.layers import SelfAttention

    compiled = []

    def record(model, on, mode=None):
        compiled.append((on, mode, {m.kernel for m in model.modules() if isinstance(m, SelfAttention)}))

    monkeypatch.setattr(compile_module, "maybe_compile", record)
    monkeypatch.setattr(sys, "argv", argv + ["--compile", "--attention-kernel", "math", "--out", str(out)])
    check_bf16.main()
    fast = json.loads(out.read_text())
    assert compiled == [(False, None, {"auto"}), (True, "default", {"math"})]
    assert fast["bf16_compiled"] and fast["bf16_attention_kernel"] == "math"
    assert fast["fp32"] == report["fp32"] and fast["bf16"]["minFDE6"] == pytest.approx(
        report["bf16"]["minFDE6"], rel=1e-3
    )


def test_predict_writes_a_valid_submission(tuned, synth_root, tmp_path, capsys):
    from av2.datasets.motion_forecasting.eval.submission import ChallengeSubmission

    out = tmp_path / "sub.parquet"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                tuned["peft"]["best"],
                f"data.root={synth_root}",
                "--out",
                str(out),
                "data.num_workers=0",
            ]
        )
        == 0
    )
    sub = ChallengeSubmission.from_parquet(out)
    assert len(sub.predictions) == 6
    assert "warning" not in capsys.readouterr().out
    # a scenario that cannot be read: the rest are predicted, and the submission says what it lacks
    root = tmp_path / "data"
    shutil.copytree(synth_root / "test", root / "test")
    (root / "test" / "broken").mkdir()
    (root / "test" / "broken" / "scenario_broken.parquet").write_bytes(b"not parquet")
    args = ["predict", "-c", tuned["peft"]["best"], f"data.root={root}", "--out", str(out), "data.num_workers=0"]
    assert main(args + ["data.preprocess_workers=1"]) == 0
    assert len(ChallengeSubmission.from_parquet(out).predictions) == 6
    assert "warning: the submission lacks 1 scenario of split 'test' that could not be read" in capsys.readouterr().out
    for probs, tracks in sub.predictions.values():
        assert np.isclose(probs.sum(), 1.0)
        (traj,) = tracks.values()
        assert traj.shape == (6, 60, 2)
    # the same forecasts as a table: a row per scenario, mode (most probable first) and step
    table_file = tmp_path / "forecasts.csv.gz"
    assert main(["predict", "-c", tuned["peft"]["best"], f"data.root={synth_root}", "--out", str(table_file)]) == 0
    assert "forecasts of 6 scenarios (a row per scenario, mode and step)" in capsys.readouterr().out
    table = pd.read_csv(table_file, dtype={"scenario_id": str, "track_id": str})
    assert list(table.columns) == ["scenario_id", "track_id", "mode", "probability", "step", "x", "y"]
    assert len(table) == 6 * 6 * 60 and set(table.step) == set(range(1, 61))
    for sid, (probs, tracks) in sub.predictions.items():
        ((track, traj),) = tracks.items()
        rows = table[table.scenario_id == sid].sort_values(["mode", "step"])
        assert (rows.track_id == track).all()
        order = np.argsort(-probs, kind="stable")
        np.testing.assert_allclose(rows.groupby("mode").probability.first(), probs[order], rtol=1e-6)
        np.testing.assert_allclose(rows[["x", "y"]].to_numpy(), traj[order].reshape(-1, 2), rtol=1e-6, atol=1e-6)


def test_eval_scores_predict_s_submission_as_its_checkpoint(tuned, synth_root, tmp_path, capsys):
    """A submission `fpeft predict` wrote for the val split, scored by `fpeft eval --forecasts`
    beside the checkpoint that made it: the same figures, so a file can be checked before it is
    uploaded, or compared with another method's file."""
    ckpt, out = tuned["ft"]["best"], tmp_path / "val.parquet"
    common = [f"data.root={synth_root}", "data.num_workers=0"]
    assert main(["predict", "-c", ckpt, "--split", "val", "--out", str(out), *common]) == 0
    assert main(["eval", "-c", ckpt, "--forecasts", str(out), "baselines=[]", "--out", str(tmp_path), *common]) == 0
    assert "submission with 16 scenarios" in capsys.readouterr().out
    network, submission = json.loads((tmp_path / "report.json").read_text())
    assert submission["name"] == "val.parquet" and submission["scenes"] == network["scenes"] == 16
    for metric in METRICS:
        assert submission[metric] == pytest.approx(network[metric], rel=1e-5, abs=1e-5), metric


# what a user's program does with a `fpeft deploy` file: torch alone, no forecast_peft
RUN_DEPLOYED = """
import sys, torch
program = torch.export.load(sys.argv[1]).module()
inputs = torch.load(sys.argv[2])
trajectories, probabilities, modes = program(*inputs)
torch.save({"trajectories": trajectories, "probabilities": probabilities, "modes": modes}, sys.argv[3])
assert not [m for m in sys.modules if m.startswith("forecast_peft")], "forecast_peft was imported"
"""


LOAD_DEPLOYED = """
import sys
from forecast_peft.deploy import load
from forecast_peft.errors import UserError
load(sys.argv[1])
for path in sys.argv[2:]:
    try:
        load(path)
    except UserError as err:
        print(err)
"""


def test_a_deployed_network_forecasts_what_predict_does_with_torch_alone(tuned, synth_root, tmp_path, capsys):
    """`fpeft deploy`'s .pt2, run in a fresh interpreter that imports torch alone on the history of
    a validation split's scenes (its future cut off), gives `fpeft predict`'s forecasts: the
    same modes in world coordinates, most probable first, with the same probabilities."""
    import subprocess

    import torch

    from forecast_peft.data.datamodule import ForecastDataModule
    from forecast_peft.deploy import INPUTS, load, program_inputs

    model = tmp_path / "peft.pt2"
    assert main(["deploy", "-c", tuned["peft"]["best"], "--out", str(model), "device=cpu"]) == 0
    said = capsys.readouterr().out
    assert f"deployable peft network (cpu, float32): {model}" in said and "torch.export.load(" in said
    table_file = tmp_path / "forecasts.csv"
    args = ["predict", "-c", tuned["peft"]["best"], f"data.root={synth_root}", "--split", "val", "--out"]
    assert main([*args, str(table_file), "data.num_workers=0"]) == 0
    table = pd.read_csv(table_file, dtype={"scenario_id": str, "track_id": str}).sort_values(["mode", "step"])
    cfg = config.compose("eval", [f"data.root={synth_root}", "data.num_workers=0", "data.eval_batch_size=16"])
    (batch,) = list(ForecastDataModule(cfg.data).loader("val"))
    inputs = program_inputs(batch)  # the history alone: the past and the present
    n = batch["x"].shape[1]
    assert [tuple(t.shape) for t in inputs[:4]] == [(16, n, 50, 2), (16, n, 3), (16, n, 2), (16, n, 50)]
    torch.save([t.clone() for t in inputs], tmp_path / "inputs.pt")  # out of the batch's one buffer
    run = [sys.executable, "-I", "-c", RUN_DEPLOYED, str(model), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")]
    subprocess.run(run, check=True, cwd=tmp_path)
    out = torch.load(tmp_path / "out.pt")
    assert out["trajectories"].shape == (16, 6, 60, 2) and out["probabilities"].shape == (16, 6)
    assert (out["modes"].sort(dim=1).values == torch.arange(6)).all()  # each of the network's modes once
    for i, sid in enumerate(batch["scenario_id"]):
        rows = table[table.scenario_id == sid]
        probs = rows.groupby("mode").probability.first().to_numpy()
        np.testing.assert_allclose(out["probabilities"][i].numpy(), probs, atol=1e-6)
        xy = out["trajectories"][i].reshape(-1, 2).numpy()
        # float32 world coordinates: some 2.5 km from the map's origin, 0.24 mm apart
        np.testing.assert_allclose(xy, rows[["x", "y"]].to_numpy(), atol=5e-4)
    # its spec, inside the file and beside it
    _, about = load(model)
    assert about == json.loads(model.with_suffix(".json").read_text())
    # read in a process of its own, where torch's warn-once messages have not been given yet: it
    # prints nothing (torch 2.11, the GPU machine's, warned that the weights' buffers are read-only).
    # Not -W error::UserWarning: that also raised pyparsing's deprecation warnings, which are
    # UserWarnings too and hidden by Python's default filters, from matplotlib 3.7 (make test-min-deps).
    # Then what is not a program, junk and a zip of torch.save's, gives one line each and nothing on
    # stderr: torch.export.load logs the current format's error with its traceback (there, not to
    # pytest's capsys) before it tries the 2.7 format, whose error then pointed at those "warnings above"
    junk, saved = tmp_path / "junk.pt2", tmp_path / "saved.pt2"
    junk.write_text("junk")
    shutil.copy(tmp_path / "inputs.pt", saved)
    loaded = subprocess.run(
        [sys.executable, "-c", LOAD_DEPLOYED, str(model), str(junk), str(saved)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert (loaded.returncode, loaded.stderr) == (0, ""), loaded.stderr[-2000:]
    lines = loaded.stdout.splitlines()
    assert [line.split(": cannot read it as a torch.export program (")[0] for line in lines] == [
        str(junk),
        str(saved),
    ], loaded.stdout
    assert "warnings above" not in loaded.stdout
    assert [i["name"] for i in about["inputs"]] == [name for name, *_ in INPUTS] and about["mode"] == "peft"
    assert about["inputs"][0]["shape"] == ["B", "N", 50, 2] and about["device"] == "cpu"
    assert len(about["checks"]) == 3 and max(c["max_diff_m"] for c in about["checks"]) < 1e-3
    # eval, predict and viz take the program as -c: its scores are the checkpoint's
    report = tmp_path / "report"
    common = [f"data.root={synth_root}", "data.num_workers=0", "baselines=[]"]
    assert main(["eval", "-c", tuned["peft"]["best"], "-c", str(model), *common, "--out", str(report)]) == 0
    rows = json.loads((report / "report.json").read_text())
    assert [r["name"].split(" (")[0] for r in rows] == ["peft", "deployed peft"]
    for metric in METRICS:
        assert rows[1][metric] == pytest.approx(rows[0][metric], abs=1e-4), metric
    assert rows[1]["trainable_params"] == rows[0]["trainable_params"] > 0  # the spec's, not the program's 0
    assert rows[1]["top_modes"] == rows[0]["top_modes"]  # the network's numbers of the modes, from `modes`
    scenes = pd.read_csv(report / "per_scenario.csv")
    mine, theirs = (scenes[scenes.name == r["name"]].sort_values("scenario_id") for r in rows)
    assert (mine.top_mode.to_numpy() == theirs.top_mode.to_numpy()).all()
    assert (mine.best_mode.to_numpy() == theirs.best_mode.to_numpy()).all()
    again = tmp_path / "again.csv"
    assert main(["predict", "-c", str(model), f"data.root={synth_root}", "--split", "val", "--out", str(again)]) == 0
    again = pd.read_csv(again, dtype={"scenario_id": str, "track_id": str}).sort_values(["scenario_id", "mode", "step"])
    first = table.sort_values(["scenario_id", "mode", "step"])
    assert (again.scenario_id.to_numpy() == first.scenario_id.to_numpy()).all()
    np.testing.assert_allclose(again[["x", "y"]].to_numpy(), first[["x", "y"]].to_numpy(), atol=5e-4)
    assert main(["viz", "-c", str(model), *common, "--num", "1", "--out", str(tmp_path / "pics")]) == 0
    assert len(list((tmp_path / "pics").glob("*.png"))) == 1
    capsys.readouterr()
    for args, message in (
        (["eval", "-c", str(model), *common, "--precision", "bf16"], f"{model} is a float32 program: score it with"),
        (["deploy", "-c", str(model)], f"{model} is a deployed program already: deploy the checkpoint it came from"),
        (["eval", "-c", str(model), *common, "attention_kernel=math"], f"{model} runs as exported: attention_kernel"),
        (["eval", "-c", str(tmp_path / "junk.pt2"), *common], f"{tmp_path / 'junk.pt2'}: cannot read it as a torch"),
    ):
        assert main(args) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"fpeft: error: {message}") and len(err.strip().splitlines()) == 1, err
    assert main(["deploy", "device=cpu"]) == 1
    assert "deploy needs --checkpoint CKPT" in capsys.readouterr().err


@pytest.mark.slow  # two more exports: 10 s
def test_deploy_takes_an_adapter_export_and_the_fine_tuning_baseline(tuned, tmp_path):
    """An adapter-only export (its base found by the path it recorded) and the fine-tuning
    baseline's network (no prompts), each into a folder given as --out."""
    from forecast_peft.deploy import load

    adapter = Path(tuned["peft"]["run_dir"]) / "adapter"
    for source, mode in ((adapter, "peft"), (tuned["baseline"]["last"], "baseline")):
        folder = tmp_path / mode
        assert main(["deploy", "-c", str(source), "--out", f"{folder}/", "device=cpu"]) == 0
        about = load(folder / "model.pt2")[1]
        assert about["mode"] == mode and max(c["max_diff_m"] for c in about["checks"]) < 1e-3


def test_a_bf16_program_scores_as_the_checkpoint_does_at_precision_bf16(tuned, synth_root, tmp_path, capsys):
    """`fpeft deploy --precision bf16`: the network under bfloat16 autocast inside the program;
    `eval --precision bf16` scores it as it scores the checkpoint in bf16, to bfloat16's rounding
    (the program's forms round differently: windowed attention, the tapped FPN)."""
    from forecast_peft.deploy import load

    model = tmp_path / "bf16.pt2"
    assert main(["deploy", "-c", tuned["ft"]["last"], "--out", str(model), "device=cpu", "--precision", "bf16"]) == 0
    said = capsys.readouterr().out
    assert f"deployable ft network (cpu, bfloat16 autocast): {model}" in said
    assert "m of the network in bf16, whose rounding moves them up to " in said
    assert f"(on a split: `fpeft eval -c {tuned['ft']['last']} --precision bf16` against --precision 32)" in said
    about = load(model)[1]
    assert about["precision"] == "bf16"
    assert all(c["max_diff_m"] <= 1e-3 and c["bf16_rounding_m"] > 1e-4 for c in about["checks"]), about["checks"]
    report = tmp_path / "report"
    common = [f"data.root={synth_root}", "data.num_workers=0", "baselines=[]", "--precision", "bf16"]
    assert main(["eval", "-c", tuned["ft"]["last"], "-c", str(model), *common, "--out", str(report)]) == 0
    rows = json.loads((report / "report.json").read_text())
    assert [r["name"].split(" (")[0] for r in rows] == ["ft", "deployed ft"]
    for metric in ("minADE6", "minFDE6", "minADE1", "minFDE1", "brier-minFDE6"):
        assert rows[1][metric] == pytest.approx(rows[0][metric], rel=0.005), metric
    scenes = pd.read_csv(report / "per_scenario.csv")
    mine, theirs = (scenes[scenes.name == r["name"]].sort_values("scenario_id") for r in rows)
    assert np.abs(mine.minFDE6.to_numpy() - theirs.minFDE6.to_numpy()).max() < 0.05
    capsys.readouterr()
    assert main(["eval", "-c", str(model), *common[:-2]]) == 1
    err = capsys.readouterr().err
    assert err == f"fpeft: error: {model} is a bfloat16 program: score it with precision=bf16 (--precision bf16)\n"


def test_without_a_compiler_deploy_writes_the_program_and_says_why_there_is_no_package(
    tuned, tmp_path, monkeypatch, capsys
):
    from torch import _inductor

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Failed to find C++ compiler. Please specify via CXX environment variable.\nmore lines")

    monkeypatch.setattr(_inductor, "aoti_compile_and_package", no_compiler)
    assert main(["deploy", "-c", tuned["ft"]["last"], "--out", str(tmp_path / "m.pt2"), "device=cpu", "aoti=true"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "fpeft: error: cannot compile m.aoti.pt2 with AOTInductor (RuntimeError: Failed to find C++ compiler. Please "
        "specify via CXX environment variable.); it needs a C++ compiler on PATH (g++ or clang++); the .pt2 program "
        "is written\n"
    )
    assert (tmp_path / "m.pt2").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.pt2"]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["32", "bf16"])
def test_the_aoti_package_forecasts_what_the_program_does(tuned, synth_root, tmp_path, capsys, precision):
    """`fpeft deploy aoti=true` (a minute or more on a CPU): the compiled package, loaded as C++
    code is, forecasts a validation batch as the program does; in bf16, to a few times bfloat16's
    own rounding (the package keeps its fused operations' values in float32)."""
    import torch
    from torch import _inductor

    from forecast_peft.data.datamodule import ForecastDataModule
    from forecast_peft.deploy import BF16_ROUNDINGS, _by_mode, load, program_inputs

    model = tmp_path / "m.pt2"
    args = ["deploy", "-c", tuned["peft"]["last"], "--out", str(model), "device=cpu", "aoti=true"]
    assert main([*args, "--precision", precision]) == 0
    assert "compiled by AOTInductor in" in capsys.readouterr().out
    package = _inductor.aoti_load_package(str(tmp_path / "m.aoti.pt2"))
    program, about = load(model)
    # eval (predict and viz read -c the same way) runs the program: the package is one line that names it
    assert main(["eval", "-c", str(tmp_path / "m.aoti.pt2"), f"data.root={synth_root}", "baselines=[]"]) == 1
    assert capsys.readouterr().err == (
        f"fpeft: error: {tmp_path / 'm.aoti.pt2'} is an AOTInductor package, which C++ or "
        "torch._inductor.aoti_load_package runs: eval, predict and viz take the program `fpeft deploy` wrote beside "
        "it (m.pt2)\n"
    )
    cfg = config.compose("eval", [f"data.root={synth_root}", "data.num_workers=0", "data.eval_batch_size=16"])
    (batch,) = list(ForecastDataModule(cfg.data).loader("val"))
    # contiguous: the package reads a strided view wrongly (the spec says so)
    inputs = [t.contiguous() for t in program_inputs(batch)]
    with torch.no_grad():
        (xy, p, modes), (want_xy, want_p, want_modes) = package(*inputs), program(*inputs)
    assert xy.shape == (16, 6, 60, 2)
    if precision == "32":
        torch.testing.assert_close(xy, want_xy, atol=1e-3, rtol=0)
        torch.testing.assert_close(p, want_p, atol=1e-5, rtol=0)
        assert torch.equal(modes, want_modes)
        # from C++, with libtorch alone: the runner `python -m forecast_peft.cpp` builds
        import subprocess

        runner = tmp_path / "forecast"
        subprocess.run([sys.executable, "-m", "forecast_peft.cpp", str(runner)], check=True)
        inputs = [t.clone() for t in inputs]  # out of the batch's one buffer
        torch.save(inputs, tmp_path / "inputs.pt")
        ran = subprocess.run(
            [str(runner), str(tmp_path / "m.aoti.pt2"), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
            capture_output=True,
            text=True,
            check=True,
        )
        assert ran.stdout == f"forecasts of 16 scenes ([16, 6, 60, 2]): {tmp_path / 'out.pt'}\n"
        for got, want in zip(torch.load(tmp_path / "out.pt"), (xy, p, modes), strict=True):
            assert torch.equal(got, want)
        torch.save(inputs[:3] + [inputs[3][..., :10]] + inputs[4:], tmp_path / "short.pt")  # 10 steps, not 50
        ran = subprocess.run(
            [str(runner), str(tmp_path / "m.aoti.pt2"), str(tmp_path / "short.pt"), str(tmp_path / "x.pt")],
            text=True,
            capture_output=True,
        )
        assert ran.returncode == 1 and not (tmp_path / "x.pt").exists()
        reason = "input_handles[3]: unmatched dim value at 2, expected: 50, but got: 10"
        refused = f"forecast: {tmp_path / 'short.pt'}: the package refused these inputs"
        # torch 2.13's libtorch puts the package's reason in its error; 2.11's (the GPU machine's)
        # prints it itself, above the runner's line
        said = [line for line in ran.stderr.splitlines() if line]
        assert said[-1] == f"{refused} ({reason})" or said[-2:] == [
            f"Error: {reason}",
            f"{refused} (its reason is printed above)",
        ], ran.stderr
        # the program given for the package beside it: one line that says which file the runner takes
        ran = subprocess.run(
            [str(runner), str(model), str(tmp_path / "inputs.pt"), str(tmp_path / "x.pt")],
            text=True,
            capture_output=True,
        )
        assert ran.returncode == 1 and ran.stderr.startswith(
            f"forecast: {model}: cannot load it as an AOTInductor package, which `fpeft deploy aoti=true` writes as "
            "NAME.aoti.pt2 beside the program NAME.pt2 ("
        ), ran.stderr
        assert len(ran.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.pt").exists(), ran.stderr
    else:  # mode by mode: near-equal probabilities may sort otherwise
        rounding = max(c["bf16_rounding_m"] for c in about["checks"])
        diff = (_by_mode(xy, modes) - _by_mode(want_xy, want_modes)).abs().max()
        assert 0 < diff <= 1e-3 + BF16_ROUNDINGS * rounding
        assert (_by_mode(p, modes) - _by_mode(want_p, want_modes)).abs().max() < 0.01


def _unwritable_folder() -> Path | None:
    """A folder that exists and takes no new file even for root (Linux's /sys), or None."""
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir="/sys"):
            return None  # pragma: no cover - a /sys that takes files
    except OSError:
        return Path("/sys") if Path("/sys").is_dir() else None


@pytest.mark.skipif(_unwritable_folder() is None, reason="needs a folder no user can write in (Linux's /sys)")
def test_an_out_where_nothing_can_be_written_fails_before_any_work(tuned, synth_root, capsys):
    """predict and deploy wrote their file after the work (a split's forecasts, an export): an
    --out folder this user cannot write in failed then, and deploy's torch error was a traceback.
    Every stage that writes now tries its folder first: one line, no progress bar, nothing done."""
    folder = _unwritable_folder()
    common = [f"data.root={synth_root}", "data.num_workers=0"]
    ckpt = tuned["peft"]["best"]
    for args, meant in (
        (["deploy", "-c", ckpt, "--out", f"{folder}/m.pt2"], f"{folder}/m.pt2: cannot write in {folder}"),
        (["deploy", "-c", ckpt, "--out", f"{folder}/"], f"{folder}/model.pt2: cannot write in {folder}"),
        (["predict", "-c", ckpt, *common, "--out", f"{folder}/f.csv"], f"{folder}/f.csv: cannot write in {folder}"),
        (["eval", "-c", ckpt, *common, "--out", str(folder)], f"{folder}: cannot write in it"),
        (["viz", "-c", ckpt, *common, "--out", str(folder)], f"{folder}: cannot write in it"),
    ):
        assert main(args) == 1, args
        err = capsys.readouterr().err
        assert err.startswith(f"fpeft: error: {meant} (") and len(err.strip().splitlines()) == 1, err
        assert err.rstrip().endswith("): give --out a folder this user can write to"), err  # no progress bar either


def test_viz_writes_pictures(tuned, synth_root, tmp_path):
    assert (
        main(
            [
                "viz",
                "-c",
                tuned["baseline"]["best"],
                f"data.root={synth_root}",
                "--num",
                "2",
                "--out",
                str(tmp_path),
                "data.num_workers=0",
            ]
        )
        == 0
    )
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 2 and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    test = tmp_path / "test"  # a split without ground truth
    args = ["viz", "-c", tuned["peft"]["best"], f"data.root={synth_root}", "--split", "test", "--out", str(test)]
    assert main(args + ["--num", "1", "data.num_workers=0"]) == 0 and len(list(test.glob("*.png"))) == 1


def test_a_picture_frames_the_history_the_modes_and_the_ground_truth():
    """The panel is centred on what it draws, with a margin, rather than on the focal agent: a
    forecast 60 m ahead made it 150 m across with the history, modes and ground truth in one half."""
    import numpy as np

    from forecast_peft.viz import FRAME_MARGIN, frame

    history = np.stack([np.linspace(-20, 0, 50), np.zeros(50)], -1)
    ahead = np.stack([np.linspace(1, 60, 60), np.zeros(60)], -1)
    turn = np.stack([np.full(60, 12.0), np.linspace(0, -14, 60)], -1)
    points = np.concatenate([history, ahead, turn, [[np.nan, np.nan]]])  # a NaN forecast is left out
    (x0, x1), (y0, y1) = frame(points)
    assert x1 - x0 == pytest.approx(y1 - y0)  # square, as the equal aspect draws it
    assert (x0 + x1) / 2 == pytest.approx(20.0) and (y0 + y1) / 2 == pytest.approx(-7.0)
    assert x0 == pytest.approx(-20 - FRAME_MARGIN) and x1 == pytest.approx(60 + FRAME_MARGIN)
    assert x1 - x0 < 2 * (60 + 15)  # the frame centred on the focal agent was 150 m across
    (x0, x1), (y0, y1) = frame(np.array([[0.0, 0.0], [2.0, 1.0]]))  # a standing agent: 50 m at the least
    assert x1 - x0 == pytest.approx(50.0) and (x0 + x1) / 2 == pytest.approx(1.0)


def test_viz_draws_the_scenarios_the_checkpoint_forecasts_worst_and_best(
    tuned, synth_root, tmp_path, capsys, monkeypatch
):
    """--select worst / best rank the split by the first checkpoint's minFDE6, as eval's
    per-scenario values give it; the files are numbered by rank; each checkpoint has a panel whose
    title gives the scene's error under that checkpoint."""
    from forecast_peft import viz

    panels, draw = [], viz.draw_scene

    def record(batch, index, forecasts, path, title=""):
        panels.append([label for label, _, _ in forecasts])
        return draw(batch, index, forecasts, path, title)

    monkeypatch.setattr(viz, "draw_scene", record)
    ckpts = [tuned["ft"]["best"], tuned["baseline"]["best"]]
    # a cache of their own (eval builds it), which the next command it prints names too
    where = [f"data.root={synth_root}", f"data.cache_dir={tmp_path / 'cache'}"]
    common = [*where, "data.num_workers=0", "data.eval_batch_size=3"]
    report = ["eval", "-c", ckpts[0], "-c", ckpts[1], "--out", str(tmp_path / "report"), "baselines=[]", *common]
    assert main(report) == 0
    said = capsys.readouterr().out.strip().splitlines()[-1]
    want = f"next: fpeft viz -c {ckpts[0]} -c {ckpts[1]} --select worst {' '.join(where)}  (pictures of the "
    assert said.startswith(want) and said.endswith(" forecasts worst)")
    scores = pd.read_csv(tmp_path / "report" / "per_scenario.csv")
    ft, baseline = (
        scores[scores["name"].str.startswith(mode)].set_index("scenario_id")["minFDE6"] for mode in ("ft", "baseline")
    )
    for select, want in (("worst", ft.sort_values(ascending=False)), ("best", ft.sort_values())):
        out = tmp_path / select
        panels.clear()
        args = ["viz", "-c", ckpts[0], "-c", ckpts[1], "--select", select, "--num", "5", "--out", str(out), *common]
        assert main(args) == 0
        said = f"wrote 5 pictures to {out}, the {select} of 16 scenarios by the minFDE6 of ft ("
        assert said in capsys.readouterr().out
        drawn = [p.name for p in sorted(out.glob("*.png"))]
        assert drawn == [f"{select}{rank:03d}_{sid}.png" for rank, sid in enumerate(want.index[:5], 1)]
        assert len(panels) == 5
        for (ft_panel, baseline_panel), sid in zip(panels, want.index):
            assert ft_panel.startswith("ft (") and ft_panel.endswith(f"minFDE6 {ft[sid]:.2f} m")
            assert baseline_panel.startswith("baseline (") and baseline_panel.endswith(f"minFDE6 {baseline[sid]:.2f} m")
    # --by: the scenes ft forecasts worst at 1 s, each panel with that value too
    early = scores[scores["name"].str.startswith("ft")].set_index("scenario_id")["minFDE6_1s"]
    early = early.sort_values(ascending=False, kind="stable")
    panels.clear()
    args = [
        "viz",
        "-c",
        ckpts[0],
        "--select",
        "worst",
        "--by",
        "minFDE6_1s",
        "--num",
        "3",
        "--out",
        str(tmp_path / "e"),
    ]
    assert main([*args, *common]) == 0
    assert "the worst of 16 scenarios by the minFDE6_1s of ft (" in capsys.readouterr().out
    drawn = [p.name for p in sorted((tmp_path / "e").glob("*.png"))]
    assert drawn == [f"worst{rank:03d}_{sid}.png" for rank, sid in enumerate(early.index[:3], 1)]
    assert [panel[0].rsplit(", ", 1)[1] for panel in panels] == [f"minFDE6_1s {v:.2f} m" for v in early.iloc[:3]]
    panels.clear()  # a baseline's panel beside the checkpoint's; a baseline alone
    for checkpoint in (["-c", ckpts[0]], []):
        args = ["viz", *checkpoint, "--baseline", "lane_following", "--num", "1", "--out", str(tmp_path / "b"), *common]
        assert main(args) == 0
    (ft_first, lane_second), (lane_alone,) = panels
    assert ft_first.startswith("ft (") and lane_second.startswith("lane_following\nminADE6 ")
    assert lane_alone == lane_second  # the same scene, the same baseline
    args = ["viz", "-c", ckpts[0], f"data.root={synth_root}", "--out", str(tmp_path / "x")]
    for extra, error in (
        (
            ["--baseline", "lane"],
            "unknown baseline lane (baselines: constant_velocity, kinematic_modes, lane_following)",
        ),
        (["--select", "worst", "--split", "test"], "--select worst ranks scenarios by their error, and the test split"),
        (["--select", "best", "--scenario", "s"], "--scenario draws one scenario, --select best chooses them"),
        (["--select", "worse"], "unknown --select 'worse' (choose first, worst, best)"),
        (["--by", "minFDE6_1s"], "--by minFDE6_1s ranks the scenarios that --select worst or --select best draws"),
        (["--select", "worst", "--by", "fde"], "unknown --by 'fde' (choose minADE1, minFDE1, minADE6, minFDE6, MR6, "),
    ):
        assert main(args + extra) == 1
        assert error in capsys.readouterr().err
    assert main(["viz", f"data.root={synth_root}", "--out", str(tmp_path / "x")]) == 1  # nothing to draw
    assert "viz needs --checkpoint CKPT" in (err := capsys.readouterr().err) and "or --baseline NAME" in err


def test_viz_of_a_scenario_of_another_split_names_that_split(tuned, synth_root, tmp_path, capsys):
    scenario = sorted(p.name for p in (synth_root / "train").iterdir())[0]
    args = ["viz", "-c", tuned["peft"]["best"], f"data.root={synth_root}", "--out", str(tmp_path)]
    assert main(args + ["--scenario", scenario]) == 1
    err = capsys.readouterr().err
    assert f"scenario '{scenario}' is not in the val split of" in err
    assert err.strip().endswith("(it is in the train split: add --split train)")
    assert main(args + ["--scenario", scenario, "--split", "train"]) == 0
    assert [p.name for p in tmp_path.glob("*.png")] == [f"{scenario}.png"]
    assert main(args + ["--scenario", "no-such-scenario"]) == 1
    assert capsys.readouterr().err.strip().endswith("is not in the val split of " + str(synth_root / "cache"))


def test_eval_and_viz_take_the_scenarios_of_the_cities_chosen(tuned, synth_root, tmp_path, capsys):
    """``data.cities``: eval scores those cities' scenarios alone and says so; viz draws from
    them, and a scenario of another city named to it is said to be left out."""
    val = ForecastDataset(synth_root / "cache", "val")
    city_of = dict(zip(val.scenario_ids(), (val[i]["city"] for i in range(len(val)))))
    city, scenes = collections.Counter(city_of.values()).most_common(1)[0]
    chosen = f"data.cities=[{city}]"
    args = ["eval", "-c", tuned["ft"]["run_dir"], f"data.root={synth_root}", chosen, "--out", str(tmp_path / "report")]
    assert main(args + ["baselines=[constant_velocity]", "data.num_workers=0"]) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [row["scenes"] for row in rows] == [scenes, scenes] and [list(row["by_city"]) for row in rows] == [
        [city]
    ] * 2
    assert set(pd.read_csv(tmp_path / "report" / "per_scenario.csv")["scenario_id"]) == {
        i for i, c in city_of.items() if c == city
    }
    assert f"({chosen}: {scenes} of 16 scenarios)" in (tmp_path / "report" / "report.md").read_text()
    assert "by city" not in out  # one city: the main table says it all
    assert f"--select worst data.root={synth_root} '{chosen}'  (pictures of" in out  # the next command, on them too
    other = next(i for i, c in city_of.items() if c != city)
    args = ["viz", "-c", tuned["ft"]["run_dir"], f"data.root={synth_root}", chosen, "--out", str(tmp_path / "pics")]
    assert main(args + ["--scenario", other]) == 1
    assert f"scenario '{other}' is in {city_of[other]}, which {chosen} leaves out" in capsys.readouterr().err


def test_a_picture_shows_the_whole_ground_truth_and_names_what_it_draws(tmp_path, monkeypatch):
    """A focal agent that goes 95 m while the modes stay near it: the picture reaches past 95 m
    (it was cut at 40 m); the legend names the histories as well as the modes."""
    import torch
    from matplotlib.figure import Figure

    from forecast_peft.viz import draw_scene

    seen = {}

    def savefig(fig, path, *args, **kwargs):
        ax = fig.axes[0]
        seen["xlim"], seen["labels"] = ax.get_xlim(), [t.get_text() for t in ax.get_legend().get_texts()]
        seen["panels"] = [(a.get_title(), a.get_xlim()) for a in fig.axes]

    monkeypatch.setattr(Figure, "savefig", savefig)
    far = torch.stack([torch.linspace(1, 95, 60), torch.zeros(60)], -1)
    batch = {
        "lane_positions": torch.zeros(1, 1, 20, 2),
        "lane_padding_mask": torch.zeros(1, 1, 20, dtype=torch.bool),
        "x_positions": torch.randn(1, 2, 50, 2),
        "x_padding_mask": torch.zeros(1, 2, 110, dtype=torch.bool),
        "x_key_padding_mask": torch.zeros(1, 2, dtype=torch.bool),
        "y": far.expand(1, 2, 60, 2),
        "scenario_id": ["s"],
    }
    draw_scene(batch, 0, [("peft", torch.zeros(6, 60, 2), torch.zeros(6))], tmp_path / "s.png")
    assert seen["xlim"][1] >= 95 and seen["xlim"][0] < float(batch["x_positions"][0, 0, :, 0].min())  # history too
    assert seen["labels"][:2] == ["focal history", "other actors"] and seen["labels"][-1] == "ground truth"
    # a panel per checkpoint, on the same axes: one whose modes run 120 m out widens both
    draw_scene(
        batch,
        0,
        [("peft", torch.zeros(6, 60, 2), torch.zeros(6)), ("ft", 1.2 * far.expand(6, 60, 2), torch.zeros(6))],
        tmp_path / "s.png",
    )
    assert [title for title, _ in seen["panels"]] == ["peft", "ft"]
    assert seen["panels"][0][1] == seen["panels"][1][1] and seen["panels"][0][1][1] >= 114


def test_out_paths(tuned, synth_root, tmp_path, capsys):
    """predict --out FOLDER writes FOLDER/submission.parquet; eval and viz, which write several
    files, refuse a file as --out in one line before any work (nothing cached yet)."""
    ckpt = tuned["peft"]["best"]
    folder = tmp_path / "subs"
    folder.mkdir()
    assert main(["predict", "-c", ckpt, "--out", str(folder), f"data.root={synth_root}", "data.num_workers=0"]) == 0
    assert (folder / "submission.parquet").is_file()
    new = tmp_path / "new"  # not there yet: a trailing slash says it is a folder
    assert main(["predict", "-c", ckpt, "--out", f"{new}/", f"data.root={synth_root}", "data.num_workers=0"]) == 0
    assert (new / "submission.parquet").is_file()
    root = tmp_path / "data"
    shutil.copytree(synth_root / "val", root / "val")
    capsys.readouterr()
    for stage in ("eval", "viz"):
        assert main([stage, "-c", ckpt, "--out", str(folder / "submission.parquet"), f"data.root={root}"]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "submission.parquet is a file: give a folder" in err, stage
    assert not (root / "cache").exists()


@pytest.mark.parametrize("precision, dtype", [("bf16-true", "bfloat16"), ("64-true", "float64")])
def test_training_in_a_true_precision(pretrained_ckpt, synth_root, tmp_path, precision, dtype, capsys):
    """Lightning's bf16-true and 64-true run the whole network in that dtype (the torch default
    dtype set too): pre-training and tuning failed in the FPN's interpolation matrix, built in the
    default dtype and filled with float32 weights. bf16-true's weights lose small updates: each
    stage warns of it."""
    import torch

    base = TINY + [f"data.root={synth_root}", f"trainer.precision={precision}", "trainer.max_epochs=1"]
    pre = stages.pretrain(config.compose("pretrain", base + [f"run_dir={tmp_path / 'pre'}"]))
    tuned = stages.tune(config.compose("tune", base + [f"pretrained={pre['last']}", f"run_dir={tmp_path / 'tune'}"]))
    warnings = capsys.readouterr().err.count("warning: trainer.precision=bf16-true keeps the weights in bfloat16")
    assert warnings == (2 if precision == "bf16-true" else 0)
    state = torch.load(tuned["last"], weights_only=False)["state_dict"]
    assert {str(v.dtype).removeprefix("torch.") for v in state.values() if v.is_floating_point()} == {dtype}
    assert np.isfinite(pd.read_csv(tmp_path / "tune" / "logs" / "metrics.csv")["val/minFDE6"].dropna()).all()


def test_resume_continues_a_run(synth_root, tmp_path, capsys):
    """The resumed run goes on from its last checkpoint with its logs, and each start of its fit
    is a line of its environment.jsonl: the command, the checkpoint resumed, software, hardware."""
    run = tmp_path / "run"
    base = TINY + [f"data.root={synth_root}", f"run_dir={run}"]
    import torch

    first = stages.pretrain(config.compose("pretrain", base + ["trainer.max_epochs=1"]))
    steps = torch.load(first["last"], weights_only=False)["global_step"]
    before = pd.read_csv(run / "logs" / "metrics.csv")
    capsys.readouterr()
    res = stages.pretrain(config.compose("pretrain", base + ["trainer.max_epochs=2", f"resume={run}"]))
    out = capsys.readouterr().out
    assert out.startswith("data: ") and f"\nresuming from {run / 'checkpoints' / 'last.ckpt'}\n" in out
    assert out.endswith(f"  next: fpeft tune --mode peft --pretrained {run} data.root=DOWNSTREAM_DATA\n")
    ckpt = torch.load(res["last"], weights_only=False)
    assert steps > 0 and ckpt["global_step"] == 2 * steps and ckpt["epoch"] == 1
    after = pd.read_csv(run / "logs" / "metrics.csv")  # the first epoch's rows kept, the second's added
    pd.testing.assert_frame_equal(after.iloc[: len(before)][before.columns], before, check_dtype=False)
    assert set(after["epoch"].dropna()) == {0, 1} and after["train/epoch_loss"].notna().sum() == 2
    import forecast_peft
    from forecast_peft.provenance import command

    starts = [json.loads(line) for line in (run / "environment.jsonl").read_text().splitlines()]
    assert [s["resumed_from"] for s in starts] == [None, str(run / "checkpoints" / "last.ckpt")]
    for start in starts:
        assert start["command"] == command() and start["started"].endswith("+00:00")
        assert start["software"]["forecast_peft"] == forecast_peft.__version__
        assert start["software"]["torch"] == torch.__version__ and start["software"]["pytorch_lightning"]
        hardware = {"processes": 1, "nodes": 1, "precision": "32-true"}
        assert start["hardware"] == {"device": start["hardware"]["device"], **hardware}
        assert start["hardware"]["device"].startswith("cpu: ")


def test_a_resumed_log_drops_the_rows_of_the_cut_epoch(tmp_path):
    """Rows past the checkpoint (epoch 1 ended at step 4; the run was stopped in epoch 2) are
    logged again by the resumed run, so they are not kept. A run or stage that starts from no
    checkpoint (NOTHING_KEPT: run again in place, or tuning after an ended TPP) keeps none."""
    from forecast_peft.training import NOTHING_KEPT, _rows_until

    log = tmp_path / "metrics.csv"
    log.write_text("epoch,lr,step,val/loss\n0,,1,5.0\n,0.1,2,\n1,,3,4.0\n,0.2,4,\n2,,5,\n,0.3,5,\n")
    assert _rows_until(log, (1, 4)) == [
        {"epoch": 0, "step": 1, "val/loss": 5.0},
        {"lr": 0.1, "step": 2},
        {"epoch": 1, "step": 3, "val/loss": 4.0},
    ]
    assert _rows_until(log, (0, 2)) == [{"epoch": 0, "step": 1, "val/loss": 5.0}]  # step 2: of the epoch after
    assert _rows_until(log, NOTHING_KEPT) == []


def test_a_damaged_log_row_is_left_out_of_a_resumed_log_and_said(tmp_path, capsys):
    """A row cut short (a crash, a full disk) in metrics.csv: resuming said nothing and failed with
    a ValueError traceback; now the readable rows are kept and the others counted. Line 3's NULs
    stopped Python 3.10's csv reader (and every row after it was lost); line 4's field is past csv's
    size limit, an error on every version, after which reading goes on."""
    from forecast_peft.training import _rows_until

    log = tmp_path / "metrics.csv"
    log.write_text('epoch,lr,step,val/loss\n0,,1,5.0\n1,,3,\x00\x00cut"short\n1,,3,' + "9" * 200_000 + "\n1,,3,4.0\n")
    rows = _rows_until(log, (1, 4))  # the epoch and step of the checkpoint resumed
    assert rows == [{"epoch": 0, "step": 1, "val/loss": 5.0}, {"epoch": 1, "step": 3, "val/loss": 4.0}]
    assert capsys.readouterr().out == (
        f"note: {log}: left out of the resumed run's log, 2 rows that could not be read (the first at line 3)\n"
    )


@pytest.mark.parametrize(
    "text, problem",
    [("stage: [unclosed\n", "not readable YAML (ParserError)"), ("", "not a run's configuration (no stage in it)")],
)
def test_a_damaged_run_configuration_is_one_line_on_resume(tuned, tmp_path, capsys, text, problem):
    run = tmp_path / "run"
    shutil.copytree(tuned["ft"]["run_dir"], run)
    (run / "config.yaml").write_text(text)
    assert main(["tune", "--resume", str(run)]) == 2
    assert capsys.readouterr().err == f"fpeft: error: {run / 'config.yaml'}: {problem}\n"


def test_a_resumed_run_whose_backbone_moved_says_how_to_find_it(tuned, pretrained_ckpt, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tuned["peft"]["run_dir"], run)
    saved = OmegaConf.load(run / "config.yaml")
    saved.pretrained = str(tmp_path / "gone" / "last.ckpt")
    OmegaConf.save(saved, run / "config.yaml")
    assert main(["tune", "--resume", str(run), "trainer.max_epochs=2"]) == 1
    assert capsys.readouterr().err == (
        f"fpeft: error: the run's pre-trained backbone {saved.pretrained} does not exist: give where it is now "
        "with --pretrained PATH\n"
    )
    assert main(["tune", "--resume", str(run), "--pretrained", str(pretrained_ckpt), "trainer.max_epochs=2"]) == 0
    assert OmegaConf.load(run / "config.yaml").pretrained == str(pretrained_ckpt)


def test_resume_keeps_the_run_configuration(tuned, tmp_path, capsys):
    """`--resume RUN` goes on with the run's own data, model and recipe (its config.yaml); the
    command's overrides come on top, and a checkpoint of another stage, mode or model is refused."""
    import torch

    run = tmp_path / "run"
    shutil.copytree(tuned["peft"]["run_dir"], run)
    saved = config.compose("tune", [f"resume={run}", "trainer.max_epochs=2"])
    assert saved.model.embed_dim == 32 and saved.data.root == OmegaConf.load(run / "config.yaml").data.root
    assert saved.trainer.max_epochs == 2 and saved.mode == "peft" and saved.run_dir == str(run)
    moved = config.compose("tune", [f"resume={run}", "data.root=/data/moved"])  # the cache follows the data root
    assert moved.data.cache_dir == "/data/moved/cache" and moved.model.embed_dim == 32
    capsys.readouterr()
    city = config.compose("tune", [f"resume={run}", "data.cities=[miami]"])  # other scenes: said
    assert city.data.cities == ["miami"] and capsys.readouterr().err.strip() == (
        "note: data.cities [] -> [miami]: the run trains and validates on other scenes from here on, and its best "
        "checkpoint so far was chosen on the scenes before"
    )
    assert main(["tune", "--resume", str(run), "trainer.max_epochs=2"]) == 0  # no data.root, no model=tiny
    assert OmegaConf.load(run / "config.yaml").trainer.max_epochs == 2  # what the run went on with
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)  # the moved run's own file, no last-v1
    assert ckpt["epoch"] == 1 and ckpt["hyper_parameters"]["mode"] == "peft"
    # the moved run's record of its best checkpoint followed it: one best file, the better epoch's
    scores = pd.read_csv(run / "logs" / "metrics.csv").dropna(subset=["val/minFDE6"])
    best = scores.loc[scores["val/minFDE6"].idxmin()]
    files = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert files == [f"best-epoch{int(best.epoch):03d}.ckpt", "last.ckpt"], (files, scores)
    finished = json.loads((run / "finished.json").read_text())
    assert finished["best"] == str((run / "checkpoints" / files[0]).resolve())
    assert finished["best_value"] == pytest.approx(best["val/minFDE6"]) and len(scores) == 2
    capsys.readouterr()
    for args, needle in (
        (["tune", "--mode", "ft"], "cannot resume with another model (checkpoint vs now: mode 'peft' vs 'ft')"),
        (["tune", "model.peft.adapter_rank=4"], "model.peft.adapter_rank 8 vs 4"),
        (["pretrain"], f"{run} is a run of `fpeft tune`: resume it with `fpeft tune --resume {run}`"),
        (["tune", "trainer.max_epochs=0"], "trainer.max_epochs=0 ends before that: give a larger trainer.max_epochs"),
    ):
        assert main(args + ["--resume", str(run)]) != 0, args
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
    after = OmegaConf.load(run / "config.yaml")  # a refused resume leaves the run's configuration as it was
    assert after.trainer.max_epochs == 2 and after.mode == "peft" and after.model.peft.adapter_rank == 8


def test_a_resumed_run_follows_the_learning_rate_weight_decay_and_batch_size_it_is_given(tuned, tmp_path, capsys):
    """``optim.lr`` and ``optim.weight_decay`` given with ``--resume`` apply from the run's step on
    (Lightning restores the optimiser and schedule with the run's first ones, while its config.yaml
    recorded the new ones); another ``data.batch_size`` keeps the schedule at the same epoch."""
    import torch

    from forecast_peft.lit.optim import warmup_cosine

    runs = {name: tmp_path / name for name in ("same", "faster", "halved")}
    for run in runs.values():
        shutil.copytree(tuned["peft"]["run_dir"], run)
    start = torch.load(runs["same"] / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert start == 3  # 24 scenes, batch 8

    def resume(name: str, *overrides: str) -> int:
        return main(["tune", "--resume", str(runs[name]), "trainer.max_epochs=2", *overrides])

    assert resume("same") == 0
    assert "resumed with" not in capsys.readouterr().out
    assert resume("faster", "optim.lr=3e-3", "optim.weight_decay=0.02") == 0
    said = "resumed with optim.lr: 0.001 -> 0.003, optim.weight_decay: 0.0001 -> 0.02, from step 3 on"
    assert said in capsys.readouterr().out
    assert resume("halved", "data.batch_size=4") == 0
    said = "resumed with 6 optimiser steps per epoch (were 3; the schedule goes on from the same epoch), from step 3 on"
    assert said in capsys.readouterr().out
    assert OmegaConf.load(runs["faster"] / "config.yaml").optim.lr == 3e-3

    states = {name: torch.load(run / "checkpoints" / "last.ckpt", weights_only=False) for name, run in runs.items()}
    assert [states[n]["lr_schedulers"][0]["base_lrs"] for n in ("same", "faster")] == [[1e-3, 1e-3], [3e-3, 3e-3]]
    decay = {n: [g["weight_decay"] for g in states[n]["optimizer_states"][0]["param_groups"]] for n in states}
    assert decay["faster"] == [0.02, 0.0] and decay["same"] == decay["halved"] == [1e-4, 0.0]
    rates = {n: pd.read_csv(run / "logs" / "metrics.csv").dropna(subset=["lr-AdamW/pg1"]) for n, run in runs.items()}
    rates = {n: r.set_index("step")["lr-AdamW/pg1"] for n, r in rates.items()}
    assert list(rates["same"].index) == list(rates["faster"].index) == [0, 1, 2, 3, 4, 5]
    before, after = rates["same"].index < start, rates["same"].index >= start
    assert (rates["faster"][before] == rates["same"][before]).all()
    # each step's rate from the schedule at that step: min_lr + (peak - min_lr) x the step's factor
    factor = (3e-3 - 1e-6) / (1e-3 - 1e-6)
    assert (rates["faster"][after] - 1e-6).to_numpy() == pytest.approx(
        factor * (rates["same"][after] - 1e-6).to_numpy(), rel=1e-6
    )
    # 6 steps an epoch from epoch 1 on: the schedule's steps 6 to 11 of 12 (warm-up: one epoch, 6 steps)
    assert states["halved"]["global_step"] == 9 and states["halved"]["lr_schedulers"][0]["last_epoch"] == 12
    assert list(rates["halved"].index) == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    expected = [1e-3 * warmup_cosine(step, 6, 12, 1e-6 / 1e-3) for step in range(6, 12)]
    assert rates["halved"][rates["halved"].index >= start].to_numpy() == pytest.approx(expected, rel=1e-9)


def test_a_moved_run_keeps_its_record_of_the_best_checkpoints_it_brought(tmp_path, recwarn):
    """Resumed in another folder, the best-checkpoint callback keeps the best scores it had (so a
    worse epoch is not taken for the best) for the checkpoints that came along, read in the new
    folder; one that did not come along is forgotten, and with none the next epoch is the best."""
    import torch
    from pytorch_lightning.callbacks import ModelCheckpoint

    from forecast_peft.training import RunCheckpoint

    tmp_path = tmp_path.resolve()  # as Lightning keeps its folder
    old, new = tmp_path / "there" / "checkpoints", tmp_path / "here" / "checkpoints"
    scores = {"best-epoch003.ckpt": torch.tensor(1.5), "best-epoch005.ckpt": torch.tensor(1.6)}
    saved = {
        "monitor": "val/minFDE6",
        "best_model_score": scores["best-epoch003.ckpt"],
        "best_model_path": str(old / "best-epoch003.ckpt"),
        "current_score": torch.tensor(1.7),
        "dirpath": str(old),
        "best_k_models": {str(old / name): score for name, score in scores.items()},
        "kth_best_model_path": str(old / "best-epoch005.ckpt"),
        "kth_value": scores["best-epoch005.ckpt"],
        "last_model_path": str(old / "last.ckpt"),
    }

    def resumed(top_k: int) -> RunCheckpoint:
        callback = RunCheckpoint(dirpath=new, monitor="val/minFDE6", mode="min", save_top_k=top_k)
        callback.load_state_dict(dict(saved))
        assert callback.dirpath == str(new) and callback.last_model_path == str(new / "last.ckpt")
        return callback

    new.mkdir(parents=True)
    for name in scores:
        (new / name).write_bytes(b"a checkpoint")
    both = resumed(2)
    assert both.best_k_models == {str(new / name): score for name, score in scores.items()}
    assert both.best_model_path == str(new / "best-epoch003.ckpt") and both.best_model_score == 1.5
    assert both.kth_best_model_path == str(new / "best-epoch005.ckpt") and both.kth_value == 1.6

    (new / "best-epoch003.ckpt").unlink()  # the best one was not copied
    one = resumed(2)
    assert one.best_k_models == {str(new / "best-epoch005.ckpt"): scores["best-epoch005.ckpt"]}
    assert one.best_model_path == one.kth_best_model_path == str(new / "best-epoch005.ckpt")
    assert one.best_model_score == one.kth_value == 1.6

    (new / "best-epoch005.ckpt").unlink()
    none = resumed(1)
    assert none.best_k_models == {} and none.best_model_path == "" and none.best_model_score is None
    assert none.kth_value == torch.inf
    assert not [w for w in recwarn if "dirpath has changed" in str(w.message)]
    # its state is kept under the key of Lightning's class, which checkpoints written before hold
    assert none.state_key == ModelCheckpoint(monitor="val/minFDE6", mode="min").state_key
    assert none.state_key.startswith("ModelCheckpoint{")


def test_early_stop(pretrained_ckpt, synth_root, tmp_path, capsys):
    """early_stop_patience=2 with a learning rate too small to move any weight (PEFT keeps the
    backbone's normalisation statistics frozen): val/minFDE6 is the same every epoch, so the run
    stops after epoch 2 of 6, and says so."""
    overrides = TINY + [f"data.root={synth_root}", f"pretrained={pretrained_ckpt}", "optim.lr=1e-30", "optim.min_lr=0"]
    overrides += ["trainer.max_epochs=6", "early_stop_patience=2", f"run_dir={tmp_path}"]
    stages.tune(config.compose("tune", overrides))
    out = capsys.readouterr().out
    assert "early stop: val/minFDE6 has not improved for 2 validation rounds" in out and "after epoch 2" in out
    # where the run is, at its start and its end, with its checkpoints and the command that reads them
    assert f" for validation\nrun: {tmp_path}\nloaded " in out and f"\nrun: {tmp_path}\n  best val/minFDE6 " in out
    assert (
        f": {tmp_path / 'checkpoints' / 'best-epoch000.ckpt'}\n  last: {tmp_path / 'checkpoints' / 'last.ckpt'}\n"
        in out
    )
    assert out.endswith(f"\n  next: fpeft eval -c {tmp_path} data.root={synth_root}\n")
    assert pd.read_csv(tmp_path / "logs" / "metrics.csv")["epoch"].max() == 2
    capsys.readouterr()
    stages.tune(config.compose("tune", overrides[:-2] + [f"run_dir={tmp_path / 'off'}"]))  # 0: all epochs
    assert pd.read_csv(tmp_path / "off" / "logs" / "metrics.csv")["epoch"].max() == 5
    assert "early stop" not in capsys.readouterr().out


def test_a_resumed_early_stop_takes_the_new_patience():
    import torch

    from forecast_peft.training import EarlyStop

    stop = EarlyStop(monitor="val/minFDE6", mode="min", patience=10)
    old = EarlyStop(monitor="val/minFDE6", mode="min", patience=2)
    old.wait_count, old.stopped_epoch, old.best_score = 2, 9, torch.tensor(1.5)
    stop.load_state_dict(old.state_dict())  # a run that stopped after epoch 9, resumed with patience 10
    assert (stop.patience, stop.wait_count, stop.stopped_epoch, float(stop.best_score)) == (10, 2, 0, 1.5)


def _sigterm_in_an_epoch(monkeypatch, folder: str | None = None, epoch: int = 1):
    """Have the trainers of ``training.make_trainer`` (those writing into a folder of that name,
    if given: ``tpp``) send this process a SIGTERM in ``epoch`` (the second, unless said), as a
    scheduler's time limit does; returns the real ``make_trainer``."""
    import signal

    import pytorch_lightning as pl

    from tests.trainer_hooks import add_callback

    class Terminate(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.current_epoch == epoch and folder in (None, Path(trainer.default_root_dir).name):
                os.kill(os.getpid(), signal.SIGTERM)

    return add_callback(Terminate, monkeypatch.setattr)


def test_sigterm_ends_with_143_and_the_way_to_resume(synth_root, tmp_path, capsys, monkeypatch):
    """A scheduler's time limit (SIGTERM) in the second epoch: Lightning stops after the step; the
    command ends with 143 (not 0, as if finished) and says how to resume; the resumed run ends."""
    from forecast_peft import training

    run = tmp_path / "run"
    args = ["tune", "--mode", "ft", *TINY, f"data.root={synth_root}", "trainer.max_epochs=3", f"run_dir={run}"]
    real = _sigterm_in_an_epoch(monkeypatch)
    assert main(args) == 143
    err = capsys.readouterr().err
    assert f"fpeft: terminated (SIGTERM): `fpeft tune --resume {run}` continues it from its last finished epoch" in err
    assert not (run / "finished.json").exists()
    monkeypatch.setattr(training, "make_trainer", real)
    assert main(["tune", "--resume", str(run)]) == 0 and (run / "finished.json").is_file()
    assert pd.read_csv(run / "logs" / "metrics.csv")["epoch"].max() == 2


def test_a_run_stopped_in_its_first_epoch_runs_again_in_place_with_logs_of_its_own(
    synth_root, tmp_path, capsys, monkeypatch
):
    """Stopped before its first epoch ended, a run has nothing to resume, and the hint says to run
    it again: in place, its logs start again. Lightning warned that "previous log files in this
    directory will be deleted", and TensorBoard showed the first try's losses beside the second's
    at the same steps."""
    from forecast_peft import training

    run = tmp_path / "run"
    args = ["tune", "--mode", "ft", *TINY, f"data.root={synth_root}", "trainer.max_epochs=1", f"run_dir={run}"]
    args += TENSORBOARD
    real = _sigterm_in_an_epoch(monkeypatch, epoch=0)
    assert main(args) == 143
    assert "no epoch of it had finished, so there is nothing to resume: run it again" in capsys.readouterr().err
    first_try = pd.read_csv(run / "logs" / "metrics.csv")
    assert first_try["train/loss"].notna().sum() >= 1 and not (run / "checkpoints" / "last.ckpt").exists()
    monkeypatch.setattr(training, "make_trainer", real)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(args) == 0
    assert not [w for w in caught if "Experiment logs directory" in str(w.message)]
    log = pd.read_csv(run / "logs" / "metrics.csv")
    assert log["step"].is_monotonic_increasing and log["val/minFDE6"].notna().sum() == 1
    if TENSORBOARD:
        losses = _tensorboard_scalars(run / "tensorboard")["train/loss"]
        assert sorted(losses) == sorted(log.dropna(subset=["train/loss"])["step"])
        assert all(len(values) == 1 for values in losses.values())


def _tensorboard_scalars(folder: Path) -> dict[str, dict[int, list[float]]]:
    """{tag: {step: values}} of the event files in ``folder`` as TensorBoard reads them: in the
    order of their names, an event that starts a session at step S (a resumed writer's
    ``purge_step``) dropping what came before it at steps S and later."""
    import struct

    from tensorboardX.proto import event_pb2

    series: dict[str, dict[int, list[float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):  # records: length (8 bytes), its checksum (4), the event, its checksum (4)
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = event_pb2.Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                for values in series.values():
                    for step in [step for step in values if step >= event.step]:
                        del values[step]
            for value in event.summary.value:
                series.setdefault(value.tag, {}).setdefault(event.step, []).append(value.simple_value)
    return series


def test_tensorboard_logs_hold_what_the_csv_logs_hold_also_when_resumed(synth_root, tmp_path, monkeypatch):
    """tensorboard=true logs into RUN/tensorboard every value the CSV logs get, at the same steps;
    a run stopped in its second epoch and resumed drops the cut epoch's values there too, so that
    TensorBoard shows one curve, not the cut epoch's beside the resumed one. The clock of
    tensorboardX's file names stands still, as when a run resumes within the second it stopped in:
    its names then held the second and the host alone, and the resumed run wrote over the stopped
    one's file."""
    import types

    event_file_writer = pytest.importorskip("tensorboardX.event_file_writer")
    from forecast_peft import training

    monkeypatch.setattr(event_file_writer, "time", types.SimpleNamespace(time=lambda: 1796000000.5))

    run = tmp_path / "run"
    args = ["tune", "--mode", "ft", *TINY, f"data.root={synth_root}", "trainer.max_epochs=3", f"run_dir={run}"]
    real = _sigterm_in_an_epoch(monkeypatch)
    assert main([*args, "tensorboard=true", "trainer.log_every_n_steps=1"]) == 143
    cut = _tensorboard_scalars(run / "tensorboard")
    monkeypatch.setattr(training, "make_trainer", real)
    assert main(["tune", "--resume", str(run)]) == 0
    csv = pd.read_csv(run / "logs" / "metrics.csv")
    board = _tensorboard_scalars(run / "tensorboard")
    tags = ["train/loss", "train/epoch_loss", "val/minFDE6", "val/minADE6"]
    for tag in tags:
        rows = csv.dropna(subset=[tag])
        want = dict(zip(rows["step"].astype(int), rows[tag]))
        assert all(len(values) == 1 for values in board[tag].values()), tag  # one value a step
        assert want and {step: values[0] for step, values in board[tag].items()} == pytest.approx(want, rel=1e-6)
    # the stopped run had logged a step of the epoch it was cut in, which the resumed one logged again
    assert max(cut["train/loss"]) in set(csv.loc[csv["epoch"] == 1, "step"].astype(int))


def _full_disk_at_write(monkeypatch, n: int) -> None:
    """The n-th checkpoint write of this process and every one after it fail as on a full disk,
    once the file is written and before it is on disk (``os.fsync``)."""
    import errno

    from forecast_peft.data import files

    calls = {"n": 0}
    real = files.os.fsync

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] >= n:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)


def test_a_checkpoint_write_that_fails_keeps_the_one_before(tmp_path, monkeypatch):
    """Lightning's own writing copies a temporary file from the system's temp folder over the
    checkpoint, in place where the two are on different file systems: a full disk then cut the
    checkpoint short (seen on a small tmpfs). Checkpoints are now written beside their name and
    renamed onto it; a failed write leaves no partial file, the checkpoint before it intact, and
    an error that names the checkpoint. The view of the serialised checkpoint that the write was
    given is released by then, not left to the garbage collector: collecting it with its BytesIO
    from the error's reference cycle crashed Python 3.12.1 (a full disk in a run, then the next run
    of the same process)."""
    import torch

    from forecast_peft import training
    from forecast_peft.training import AtomicCheckpointIO

    given, write = [], training.write_bytes_atomic
    monkeypatch.setattr(training, "write_bytes_atomic", lambda path, data: write(path, given.append(data) or data))
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"epoch": 0, "w": torch.arange(5.0)}, path)
    _full_disk_at_write(monkeypatch, 1)
    with pytest.raises(OSError) as err:
        AtomicCheckpointIO().save_checkpoint({"epoch": 1, "w": torch.zeros(5)}, path)
    assert err.value.filename2 == str(path) and err.value.strerror == "No space left on device"
    with pytest.raises(ValueError, match="released memoryview"):
        given[-1].tobytes()
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
    kept = torch.load(path)
    assert kept["epoch"] == 0 and kept["w"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_a_full_disk_stops_a_run_in_one_line_that_says_how_to_resume_it(synth_root, tmp_path, capsys, monkeypatch):
    """The third checkpoint write (epoch 1's best; epoch 0 wrote its best and last.ckpt) meets a
    full disk: one line naming the checkpoint and the command that resumes the run, exit code 1,
    no partial file; the resumed run ends. Before, an OSError without the way to resume."""
    run = tmp_path / "run"
    args = ["tune", "--mode", "ft", *TINY, f"data.root={synth_root}", "trainer.max_epochs=2", f"run_dir={run}"]
    _full_disk_at_write(monkeypatch, 3)
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"fpeft: error: no space left on the device writing {run / 'checkpoints' / 'best-epoch001.ckpt'}: free "
        f"some space, or write to a larger disk; `fpeft tune --resume {run}` continues it from its last finished epoch"
    )
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best-epoch000.ckpt", "last.ckpt"]
    assert not (run / "finished.json").exists()
    monkeypatch.undo()
    assert main(["tune", "--resume", str(run)]) == 0 and (run / "finished.json").is_file()
    assert pd.read_csv(run / "logs" / "metrics.csv")["epoch"].max() == 1


def test_a_small_shared_memory_is_one_line_that_says_what_to_do(tuned, synth_root, tmp_path, capsys, monkeypatch):
    """DataLoader workers pass batches in shared memory, which a container may have little of
    (Docker's default /dev/shm is 64 MB). torch's refusal in a worker came out as two tracebacks
    (seen with a 4 MB /dev/shm); now a line with the size wanted, the room there and what to do,
    in training (with the way to resume) and in evaluation."""
    import torch

    def refuse(cls, size):
        raise RuntimeError("unable to allocate shared memory(shm) for file </torch_1>: No space left on device (28)")

    monkeypatch.setattr(torch.UntypedStorage, "_new_shared", classmethod(refuse))
    forked = "data.worker_start=fork"  # workers forked from this process inherit the refusal
    run = tmp_path / "run"
    args = ["tune", "--mode", "ft", *TINY, f"data.root={synth_root}", "trainer.max_epochs=1", f"run_dir={run}"]
    assert main([*args, "data.num_workers=1", forked]) == 1
    assert not multiprocessing.active_children()  # the workers ended with the run, not at a later collection
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert "Traceback" not in err
    assert re.fullmatch(
        r"fpeft: error: out of shared memory for a batch of the DataLoader workers "
        r"\(\d+\.\d MB; /dev/shm: \d+ of \d+ MB free\): give the machine or container more "
        r"\(docker run --shm-size=2g\), or lower data\.num_workers \(0 builds the batches in the main "
        r"process, without shared memory\) or the batch size; no epoch of it had finished, so there is "
        r"nothing to resume: run it again",
        line,
    ), line
    evaluate = ["eval", "-c", tuned["ft"]["last"], f"data.root={synth_root}", "--out", str(tmp_path / "eval")]
    assert main([*evaluate, "data.num_workers=1", forked]) == 1
    assert not multiprocessing.active_children()
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("fpeft: error: out of shared memory")
    assert main([*evaluate, "data.num_workers=0"]) == 0  # the advice: no workers, no shared memory


CUDA_OOM = (  # torch's words (2.x) for an allocation the GPU has no room for
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.06 GiB "
    "is free. Including non-PyTorch memory, this process has 78.12 GiB memory in use. Of the allocated memory "
    "77.50 GiB is allocated by PyTorch, and 120.00 MiB is reserved by PyTorch but unallocated. If reserved but "
    "unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid "
    "fragmentation.  See documentation for Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html)"
)


@pytest.mark.parametrize("where", ["train", "validation"])
def test_running_out_of_gpu_memory_says_what_to_lower(synth_root, tmp_path, capsys, monkeypatch, where):
    """CUDA's out-of-memory error (a paragraph, after a traceback) in training's second epoch:
    one line with what was wanted and free, the batch size of the loop it happened in, bf16 and
    the way to resume; the run resumes with a smaller batch, as the line says."""
    import pytorch_lightning as pl
    import torch

    from forecast_peft import training
    from tests.trainer_hooks import add_callback

    class OutOfMemory(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            if where == "train" and trainer.current_epoch == 1:
                raise torch.cuda.OutOfMemoryError(CUDA_OOM)

        def on_validation_batch_start(self, trainer, *args):
            if where == "validation" and trainer.current_epoch == 1:
                raise torch.cuda.OutOfMemoryError(CUDA_OOM)

    real = add_callback(OutOfMemory, monkeypatch.setattr)
    run = tmp_path / "run"
    args = ["tune", "--mode", "ft", *TINY, f"data.root={synth_root}", "trainer.max_epochs=2", f"run_dir={run}"]
    assert main(args) == 1
    err = capsys.readouterr().err
    key = "data.batch_size" if where == "train" else "data.eval_batch_size"
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "fpeft: error: out of GPU memory (tried to allocate 2.00 GiB; GPU 0 had 1.06 GiB free of 79.19 GiB): "
        f"lower {key} (now 8), or train in bfloat16 (trainer.precision=bf16-mixed); "
        f"`fpeft tune --resume {run}` continues it from its last finished epoch"
    )
    monkeypatch.setattr(training, "make_trainer", real)
    assert main(["tune", "--resume", str(run), f"{key}=4"]) == 0 and (run / "finished.json").is_file()


def test_running_out_of_gpu_memory_in_evaluation_says_what_to_lower(tuned, synth_root, tmp_path, capsys, monkeypatch):
    import torch

    from forecast_peft import evaluation

    def predictor(model, precision="32", cuda_graphs=False):
        def predict(batch):
            raise torch.cuda.OutOfMemoryError(CUDA_OOM)

        return predict

    monkeypatch.setattr(evaluation, "model_predictor", predictor)
    for stage in (["eval", "--out", str(tmp_path / "eval")], ["predict", "--out", str(tmp_path / "s.parquet")]):
        assert main([*stage, "-c", tuned["ft"]["last"], f"data.root={synth_root}", "data.eval_batch_size=16"]) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert err.strip().splitlines()[-1] == (
            "fpeft: error: out of GPU memory (tried to allocate 2.00 GiB; GPU 0 had 1.06 GiB free of 79.19 GiB): "
            "lower data.eval_batch_size (now 16), or use --precision bf16"
        )
    bf16 = ["predict", "-c", tuned["ft"]["last"], f"data.root={synth_root}", "--precision", "bf16"]
    assert main([*bf16, "--out", str(tmp_path / "s.parquet")]) == 1
    assert capsys.readouterr().err.strip().endswith("lower data.eval_batch_size (now 64)")  # bf16 already


@pytest.mark.parametrize(
    "stage, workers, order",
    [(["pretrain"], 0, "random"), (["tune", "--mode", "ft", "model.drop_path=0.2"], 1, "bucket")],
    ids=["pretrain", "ft-drop-path-workers-bucket"],
)
def test_a_resumed_run_trains_as_if_it_had_never_stopped(synth_root, tmp_path, monkeypatch, stage, workers, order):
    """A run stopped by SIGTERM in its second epoch and resumed logs the same losses and metrics
    at every step and ends with the same weights as the run never stopped: its training order is
    the seed's and the epoch's, and its checkpoint holds the random state (MAE masks, drop-path)
    of the epoch's end. Before, the resumed run drew another order and other masks from then on
    (torch's RandomSampler drew from the process's random state, which the sanity check and the
    model's initialisation had moved on)."""
    import torch

    from forecast_peft import training

    args = [*stage[:1], *TINY, *stage[1:], f"data.root={synth_root}", "trainer.max_epochs=3"]
    args += [f"data.num_workers={workers}", f"data.train_order={order}"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert main(args + [f"run_dir={straight}"]) == 0
    real = _sigterm_in_an_epoch(monkeypatch)
    assert main(args + [f"run_dir={stopped}"]) == 143
    assert torch.load(stopped / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 0
    monkeypatch.setattr(training, "make_trainer", real)
    assert main([stage[0], "--resume", str(stopped)]) == 0
    logs = [pd.read_csv(run / "logs" / "metrics.csv") for run in (straight, stopped)]
    assert logs[0]["epoch"].max() == 2 and logs[0]["train/loss"].notna().sum() == 3 * 3  # 24 scenes, batch 8
    pd.testing.assert_frame_equal(logs[1], logs[0], check_exact=True)
    weights = [
        torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"] for run in (straight, stopped)
    ]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_the_random_state_is_set_back_only_where_the_checkpoint_kept_it(capsys):
    """RandomState sets the kept random state back at the first epoch of the fit resumed from the
    checkpoint that holds it (same step, same number of processes); otherwise it says why not
    (another number of processes) or leaves it (a checkpoint written within an epoch)."""
    from types import SimpleNamespace

    import torch

    from forecast_peft.training import RandomState

    module = SimpleNamespace(device=torch.device("cpu"))
    trainer = SimpleNamespace(global_step=12, world_size=1, global_rank=0, is_global_zero=True)
    keeper = RandomState()
    keeper.on_train_epoch_end(trainer, module)
    expected = torch.rand(5)
    kept = keeper.state_dict()

    for step, ranks, restored, note in [(12, 1, True, False), (11, 1, False, False), (12, 2, False, True)]:
        callback = RandomState()
        callback.load_state_dict({**kept, "global_step": step, "ranks": kept["ranks"] * ranks})
        torch.rand(3)  # the resumed process has drawn other numbers
        callback.on_train_epoch_start(trainer, module)
        assert torch.equal(torch.rand(5), expected) == restored
        out = capsys.readouterr().out
        assert ("the checkpoint holds the random state of 2 processes and this fit has 1" in out) == note
        callback.on_train_epoch_start(trainer, module)  # once only: the next epoch goes on as it is
        assert capsys.readouterr().out == ""
    assert RandomState().state_dict() == {}  # nothing kept before an epoch ends


def test_a_run_stopped_in_its_target_parameter_pretraining_resumes_there(
    pretrained_ckpt, synth_root, tmp_path, capsys, monkeypatch
):
    """SIGTERM in the second TPP epoch: the hint, `fpeft runs`, a second start in the same
    run_dir and a sweep's rerun all see the TPP checkpoint; `--resume RUN` goes on with TPP from
    it and then tunes. A run stopped after its TPP ended goes on from the TPP's last weights."""
    import torch

    from forecast_peft import training
    from forecast_peft.runs import find_runs, format_runs

    run = tmp_path / "run"
    args = ["tune", "--mode", "peft", "--pretrained", str(pretrained_ckpt), "--tpp-epochs", "2", *TINY]
    args += [f"data.root={synth_root}", "trainer.max_epochs=1", f"run_dir={run}", *TENSORBOARD]
    real = _sigterm_in_an_epoch(monkeypatch, folder="tpp")
    assert main(args) == 143
    tpp_last = run / "tpp" / "checkpoints" / "last.ckpt"
    assert torch.load(tpp_last, weights_only=False)["epoch"] == 0 and not (run / "checkpoints").exists()
    err = capsys.readouterr().err
    assert f"terminated (SIGTERM): `fpeft tune --resume {run}` continues it from its last finished epoch" in err
    assert "0/1 (interrupted in target-parameter pre-training)" in format_runs(find_runs(tmp_path)[0])
    monkeypatch.setattr(training, "make_trainer", real)
    assert main(args) != 0  # not started again over the TPP epochs it has
    assert f"run_dir {run} already holds a run: `fpeft tune --resume {run}` continues it" in capsys.readouterr().err
    assert stages._runs_in_folders([tmp_path]) == [str(tmp_path)]  # no tuning checkpoint to score yet

    assert main(["tune", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"resuming from {tpp_last} (target-parameter pre-training; tuning follows it)\n" in out
    assert "loaded 177 tensors (backbone, prompts, adapters) from target-parameter pre-training" in out
    tpp_log = pd.read_csv(run / "tpp" / "logs" / "metrics.csv")
    assert set(tpp_log["epoch"].dropna()) == {0, 1} and tpp_log["train/epoch_loss"].notna().sum() == 2
    assert torch.load(tpp_last, weights_only=False)["epoch"] == 1 and (run / "finished.json").is_file()

    # stopped in the first tuning epoch, after the TPP ended: TPP trains no more, its weights go on
    shutil.rmtree(run / "checkpoints")
    (run / "finished.json").unlink()
    tpp_state = {k.removeprefix("model."): v for k, v in torch.load(tpp_last, weights_only=False)["state_dict"].items()}
    handed = {}
    real_tpp = stages._target_parameter_pretraining

    def target_parameter_pretraining(*args):
        model = real_tpp(*args)
        handed.update(model.state_dict())
        return model

    monkeypatch.setattr(stages, "_target_parameter_pretraining", target_parameter_pretraining)
    assert pd.read_csv(run / "logs" / "metrics.csv")["val/minFDE6"].notna().sum() == 1  # the tuning cut short
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["tune", "--resume", str(run)]) == 0 and (run / "finished.json").is_file()
    assert handed.keys() == tpp_state.keys() and all(torch.equal(handed[k], tpp_state[k]) for k in tpp_state)
    pd.testing.assert_frame_equal(pd.read_csv(run / "tpp" / "logs" / "metrics.csv"), tpp_log)
    # the tuning's log starts again, as the tuning does, without Lightning's "previous log files
    # in this directory will be deleted" (which a user took for the loss of the run's logs)
    assert pd.read_csv(run / "logs" / "metrics.csv")["val/minFDE6"].notna().sum() == 1
    assert not [w for w in caught if "Experiment logs directory" in str(w.message)]
    if TENSORBOARD:
        assert [len(values) for values in _tensorboard_scalars(run / "tensorboard")["val/minFDE6"].values()] == [1]


def test_a_run_directory_in_use_is_refused(synth_root, tmp_path, capsys):
    """While one process trains in a run directory (its lock held), the same command, or
    --resume, started by another process is refused in one line with the first one's pid,
    before anything in it changes; once the run has ended its directory is free again."""
    import fcntl

    run = tmp_path / "run"
    args = ["pretrain", *TINY, f"data.root={synth_root}", "trainer.max_epochs=1", f"run_dir={run}"]
    run.mkdir()
    other = open(run / config.RUN_LOCK, "w")  # another process's hold: a lock of another open file
    fcntl.flock(other, fcntl.LOCK_EX)
    other.write("4242")
    other.flush()
    assert main(args) == 2  # a configuration error, like a run_dir that holds a finished run
    err = capsys.readouterr().err
    assert err == (
        f"fpeft: error: run_dir {run} is in use by another fpeft process (pid 4242): wait for it to end, "
        "or give another run_dir=\n"
    )
    assert sorted(p.name for p in run.iterdir()) == [config.RUN_LOCK]  # nothing written
    other.close()
    assert main(args) == 0
    with open(run / config.RUN_LOCK, "a+") as again:  # the finished run let go of it
        fcntl.flock(again, fcntl.LOCK_EX | fcntl.LOCK_NB)
        again.seek(0)
        assert again.read() == str(os.getpid())
        capsys.readouterr()
        assert main(["pretrain", "--resume", str(run), "trainer.max_epochs=2"]) == 2
    assert f"run_dir {run} is in use by another fpeft process (pid {os.getpid()})" in capsys.readouterr().err
    assert (run / "finished.json").is_file()  # refused before anything in it changed


def test_resume_target_finds_a_target_parameter_pretraining_checkpoint(tmp_path):
    run, named_tpp = tmp_path / "run", tmp_path / "tpp"  # a tuning run; a run whose run_dir is named tpp
    for folder in (run / "tpp" / "checkpoints", named_tpp / "checkpoints"):
        folder.mkdir(parents=True)
        (folder / "last.ckpt").touch()
    (run / "config.yaml").touch()
    (named_tpp / "config.yaml").touch()
    tpp_last = run / "tpp" / "checkpoints" / "last.ckpt"
    assert config.resume_target(run) == (run, tpp_last) and config.in_tpp(run, tpp_last)
    assert config.resume_target(tpp_last) == (run, tpp_last)  # a TPP checkpoint belongs to its tuning run
    assert config.resume_target(named_tpp / "checkpoints" / "last.ckpt")[0] == named_tpp
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").touch()  # tuning has begun: it goes on from there
    assert config.resume_target(run) == (run, run / "checkpoints" / "last.ckpt")
    assert not config.in_tpp(run, run / "checkpoints" / "last.ckpt")


def test_a_worker_killed_by_the_same_sigterm_is_no_traceback():
    """Where the DataLoader workers got the SIGTERM too, the fit fails with their RuntimeError:
    the stop is said as the SIGTERM's. A worker's end by a SIGTERM of its own is said as such."""
    from types import SimpleNamespace

    from forecast_peft.errors import StorageError, Terminated
    from forecast_peft.training import fit

    def killed(*args, **kwargs):
        raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.")

    cfg = SimpleNamespace(stage="pretrain", run_dir="/no/run")
    with pytest.raises(Terminated, match="terminated \\(SIGTERM\\): no epoch of it had finished"):
        fit(SimpleNamespace(fit=killed, received_sigterm=True, strategy=SimpleNamespace()), cfg, None)
    # without a SIGTERM to this process (one to the worker alone): the worker's end, in a line
    with pytest.raises(StorageError, match=r"^DataLoader worker \(pid 1\) was ended by SIGTERM; no epoch of it had"):
        fit(SimpleNamespace(fit=killed, received_sigterm=False, strategy=SimpleNamespace()), cfg, None)


def _workers_end_by_sigkill(monkeypatch) -> None:
    """A DataLoader worker that reads scenes ends by SIGKILL, as the out-of-memory killer ends one
    (forked workers inherit the patch: ``data.worker_start=fork``)."""
    import signal

    from torch.utils.data import get_worker_info

    real = ForecastDataset.__getitems__

    def ends_in_a_worker(self, indices):
        if get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, indices)

    monkeypatch.setattr(ForecastDataset, "__getitems__", ends_in_a_worker)


_SIGKILLED_WORKER = (
    r"fpeft: error: DataLoader worker \(pid \d+\) was ended by SIGKILL \(as the system's out-of-memory killer ends "
    r"a process\): fewer workers \(data.num_workers\) or smaller batches \(data.batch_size\) need less memory"
)


def test_an_evaluation_worker_that_the_out_of_memory_killer_ends_is_a_line(synth_root, tmp_path, monkeypatch, capsys):
    _workers_end_by_sigkill(monkeypatch)
    argv = ["eval", f"data.root={synth_root}", "data.num_workers=1", "data.worker_start=fork", f"out={tmp_path}"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and re.fullmatch(_SIGKILLED_WORKER, err.splitlines()[-1]), err  # after the bar


def test_a_training_worker_that_the_out_of_memory_killer_ends_is_a_line_with_the_way_to_resume(
    synth_root, tmp_path, monkeypatch, capsys
):
    """A DataLoader worker ended by SIGKILL (as the system's out-of-memory killer ends one) stopped
    the run with torch's traceback, raised wherever the main process was (its SIGCHLD handler).
    Now it stops with one line: the worker, its signal, what needs less memory, how to resume."""
    _workers_end_by_sigkill(monkeypatch)
    run = tmp_path / "run"
    argv = ["pretrain", *TINY, f"data.root={synth_root}", "data.num_workers=1", "data.worker_start=fork"]
    assert main([*argv, "trainer.max_epochs=1", f"run_dir={run}"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.splitlines()[-1]
    assert re.fullmatch(
        _SIGKILLED_WORKER + "; no epoch of it had finished, so there is nothing to resume: run it again", line
    )


def test_ctrl_c_says_how_to_resume(tmp_path, capsys):
    from types import SimpleNamespace

    from forecast_peft.training import ResumeHint

    hint = ResumeHint("tune", tmp_path)
    trainer = SimpleNamespace(is_global_zero=True, state=SimpleNamespace(stage="validate"))
    hint.on_exception(trainer, None, KeyboardInterrupt())
    assert "interrupted: no epoch of it had finished, so there is nothing to resume" in capsys.readouterr().err
    assert hint.stopped_in == "validate"  # the loop it stopped, which Lightning forgets after (memory_advice)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").touch()
    hint.on_exception(trainer, None, KeyboardInterrupt())
    assert f"interrupted: `fpeft tune --resume {tmp_path}` continues it" in capsys.readouterr().err
    hint.on_exception(trainer, None, ValueError())  # other errors speak for themselves
    other = SimpleNamespace(is_global_zero=False, state=trainer.state)
    hint.on_exception(other, None, KeyboardInterrupt())  # one process says it
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "args, needle",
    [
        (["tune", "--mode", "nope"], "unknown --mode"),
        (["tune", "--tpp-epochs", "1"], "needs a frozen pre-trained backbone"),
        (["eval", "--checkpoint", "/no/such.ckpt"], "does not exist"),
        (["predict", "--checkpoint", "/no/such.ckpt"], "checkpoint /no/such.ckpt does not exist"),
        (["predict"], "predict needs --checkpoint CKPT (a `fpeft tune` checkpoint)"),
        (["viz", "-c", "/no/such.ckpt", "-c", "/no/run"], "checkpoint /no/such.ckpt does not exist"),
        # a bad --precision fails before the checkpoint (here the data root, no checkpoint) is read
        (["eval", "--checkpoint", "ROOT", "--precision", "fp16"], "precision must be one of 32, bf16"),
        (["predict", "--checkpoint", "ROOT", "--precision", "16"], "precision must be one of 32, bf16"),
    ],
)
def test_user_errors(args, needle, synth_root, capsys):
    args = [str(synth_root) if arg == "ROOT" else arg for arg in args]
    assert main(args + [f"data.root={synth_root}"]) != 0
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_empty_split_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    code = main(["pretrain", f"data.root={tmp_path}", f"runs_root={tmp_path / 'runs'}"] + TINY)
    err = capsys.readouterr().err
    assert code == 1 and "holds no scenarios" in err and "train" in err
    assert not (tmp_path / "runs").exists()  # no run directory left for a run that never started
    assert len(err.strip().splitlines()) == 1


def test_compiled_eval_of_several_networks_starts_each_from_an_empty_cache(tuned, synth_root, tmp_path, monkeypatch):
    """torch.compile keeps 8 graphs per function and then runs eagerly: `eval compile=true` over
    networks of several sizes or modes clears the cache between them, and keeps it for two
    checkpoints of one network. (Compiling itself is left out here: `make test-slow` does it.)"""
    import torch

    from forecast_peft.models import compile as compile_module

    resets = []
    monkeypatch.setattr(torch.compiler, "reset", lambda: resets.append(1))
    monkeypatch.setattr(compile_module, "maybe_compile", lambda model, enabled, mode=None: None)
    args = [f"data.root={synth_root}", "data.num_workers=0", "compile=true", "baselines=[]"]
    peft = tuned["peft"]
    assert main(["eval", "-c", peft["best"], "-c", peft["last"], *args, "--out", str(tmp_path / "a")]) == 0
    assert resets == []
    modes = [tuned[mode]["last"] for mode in ("peft", "ft", "baseline")]
    assert main(["eval", *(f"-c{c}" for c in modes), *args, "--out", str(tmp_path / "b")]) == 0
    assert len(resets) == 2


def test_eval_with_cuda_graphs_feeds_fixed_shapes_and_scores_as_without(
    tuned, synth_root, tmp_path, monkeypatch, capsys
):
    """compile_mode=reduce-overhead (CUDA graphs; a graph per batch shape) compiles in that mode
    without compile=true, feeds batches in fixed shapes, copies each batch's forecasts out of the
    graph's memory, and gives the report of plain evaluation. (Compiling itself is left out here:
    the CPU records no CUDA graphs; tests/test_gpu.py runs it on a GPU.)"""
    import torch

    from forecast_peft.data import dataset
    from forecast_peft.models import compile as compile_module

    compiled, statics, steps = [], [], []
    monkeypatch.setattr(
        compile_module, "maybe_compile", lambda model, enabled, mode=None: compiled.append((enabled, mode))
    )
    collate = dataset.collate_scenes
    monkeypatch.setattr(dataset, "collate_scenes", lambda *a, **k: statics.append(k["static"]) or collate(*a, **k))
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    args = [
        "eval",
        "-c",
        tuned["peft"]["last"],
        f"data.root={synth_root}",
        "data.num_workers=0",
        "data.eval_batch_size=6",
    ]
    reports = {}
    for mode in ("default", "reduce-overhead"):
        out = tmp_path / mode
        statics.clear()
        assert main([*args, f"compile_mode={mode}", "--out", str(out)]) == 0
        reports[mode] = json.loads((out / "report.json").read_text())
        assert statics and set(statics) == {mode == "reduce-overhead"}
        printed = capsys.readouterr()
        note = "note: compile_mode=reduce-overhead records CUDA graphs on a GPU only; on cpu it compiles without them"
        assert (note in printed.out + printed.err) == (mode == "reduce-overhead")
    assert compiled == [(False, None), (True, "reduce-overhead")]
    assert len(steps) == 3  # a new CUDA-graph step for each of the model's batches (16 scenes)
    for plain, graphs in zip(reports["default"], reports["reduce-overhead"]):
        assert plain["name"] == graphs["name"] and plain["scenes"] == graphs["scenes"] == 16
        for metric in METRICS:
            assert graphs[metric] == pytest.approx(plain[metric], rel=1e-5), (plain["name"], metric)
    assert main([*args, "compile_mode=fast"]) == 2  # a bad value, before any work
    assert (
        "compile_mode must be one of default, max-autotune-no-cudagraphs, reduce-overhead, max-autotune, got 'fast'"
        in (capsys.readouterr().err)
    )


def test_forecasts_outlive_the_cuda_graph_memory_they_came_from():
    """Under CUDA graphs the network's outputs live in the graph's memory, which its next call
    overwrites; ``predict`` keeps every batch's forecasts until the end. A network that writes
    each answer into one buffer, as a replayed graph does: the predictor's copies keep theirs."""
    import torch

    from forecast_peft.evaluation import model_predictor

    class OneBuffer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.out = {"y_hat": torch.zeros(1, 6, 60, 2), "pi": torch.zeros(1, 6)}

        def forward(self, batch):
            for value in self.out.values():
                value.fill_(float(batch["x"][0, 0, 0, 0]))
            return self.out

    predict = model_predictor(OneBuffer(), "32", cuda_graphs=True)
    first, second = (predict({"x": torch.full((1, 1, 50, 2), v)}) for v in (1.0, 2.0))
    assert (first[0] == 1).all() and (first[1] == 1).all() and (second[0] == 2).all()


def test_predict_with_cuda_graphs_writes_the_plain_submission(tuned, synth_root, tmp_path, monkeypatch):
    from av2.datasets.motion_forecasting.eval.submission import ChallengeSubmission

    from forecast_peft.models import compile as compile_module

    monkeypatch.setattr(compile_module, "maybe_compile", lambda model, enabled, mode=None: None)
    args = ["predict", "-c", tuned["peft"]["best"], f"data.root={synth_root}", "data.num_workers=0"]
    subs = []
    for mode in ("default", "reduce-overhead"):
        assert main([*args, f"compile_mode={mode}", "--out", str(tmp_path / f"{mode}.parquet")]) == 0
        subs.append(ChallengeSubmission.from_parquet(tmp_path / f"{mode}.parquet").predictions)
    assert subs[0].keys() == subs[1].keys() and len(subs[0]) == 6
    for sid, (probs, tracks) in subs[0].items():
        np.testing.assert_allclose(subs[1][sid][0], probs, rtol=1e-5, atol=1e-6)
        (track,) = tracks
        np.testing.assert_allclose(subs[1][sid][1][track], tracks[track], rtol=1e-5, atol=1e-4)


def test_a_diverging_run_stops_says_so_and_is_not_resumed(pretrained_ckpt, synth_root, tmp_path, capsys):
    """A learning rate far too high: the training loss went NaN and the run trained on for every
    epoch, ending with exit code 0 and a 'best' value as if all was well."""
    run = tmp_path / "runs" / "hot"
    args = ["tune", "--mode", "ft", "--pretrained", str(pretrained_ckpt), *TINY, f"data.root={synth_root}"]
    args += [f"run_dir={run}", "trainer.max_epochs=6", "optim.lr=1e3", "optim.warmup_epochs=0"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert re.search(r"fpeft: error: training diverged: train/epoch_loss was (nan|inf) in epoch \d, so", err), err
    assert "with a lower optim.lr (now 1000)" in err and "damaged" not in err  # its cache was checked and sound
    epoch = json.loads((run / "finished.json").read_text())["diverged_epoch"]
    log = pd.read_csv(run / "logs" / "metrics.csv")
    assert epoch < 5 and log["epoch"].max() == epoch  # it stopped in that epoch
    assert not np.isfinite(log.loc[log["epoch"] == epoch, "train/epoch_loss"]).any()
    assert main(["tune", "--resume", str(run)]) == 1
    assert f"{run} diverged in epoch {epoch}" in capsys.readouterr().err
    assert main(["runs", str(tmp_path / "runs")]) == 0
    assert f"(diverged in epoch {epoch})" in capsys.readouterr().out


def _damage_fourth_focal_track(shard) -> str:
    """NaN over 20 history steps of the fourth scene's focal track in a cached shard, its files
    the same size (a disk or a copy that changed bytes); returns that scene's scenario id."""
    from forecast_peft.data.cache import load_shard

    loaded = load_shard(shard)
    positions = np.load(shard / "positions.npy", mmap_mode="r+")
    positions[loaded.arrays["actor_offsets"][3], 20:40] = np.nan
    positions.flush()
    return loaded.meta["scenario_id"][3]


def test_a_run_on_a_damaged_cache_names_the_damage_not_the_learning_rate(pretrained_ckpt, synth_root, tmp_path, capsys):
    """A cache shard whose bytes changed without its files being cut short (which the cache check
    finds) fed NaN inputs: the run diverged in its first epoch and its error advised a lower
    learning rate, which could never help; NaN validation inputs left every validation round NaN
    and the 'best' checkpoint chosen on nothing, without a word."""
    root = tmp_path / "data"
    for part in ("train", "val", "cache"):
        shutil.copytree(synth_root / part, root / part)
    shard = root / "cache" / "train" / "shard-00000"
    scenario = _damage_fourth_focal_track(shard)
    run = tmp_path / "run"
    args = ["tune", "--mode", "ft", "--pretrained", str(pretrained_ckpt), *TINY, f"data.root={root}"]
    assert main(args + [f"run_dir={run}", "trainer.max_epochs=2", "data.num_workers=0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        "fpeft: error: training diverged: train/epoch_loss was nan in epoch 0, and the cache is damaged: "
        f"{shard / 'positions.npy'} holds 40 NaN/inf values (scenario {scenario}), values that preprocessing "
        f"never writes; delete {shard} (the next run caches the scenarios again from the data root), then run "
        "again in a new run directory"
    )
    shutil.rmtree(shard)  # as it says
    assert main(args + [f"run_dir={tmp_path / 'again'}", "trainer.max_epochs=1", "data.num_workers=0"]) == 0
    assert json.loads((tmp_path / "again" / "finished.json").read_text())["best_value"] > 0
    assert "warning" not in capsys.readouterr().err
    shard = root / "cache" / "val" / "shard-00000"
    scenario = _damage_fourth_focal_track(shard)
    assert main(args + [f"run_dir={tmp_path / 'val'}", "trainer.max_epochs=2", "data.num_workers=0"]) == 0
    assert json.loads((tmp_path / "val" / "finished.json").read_text())["best_value"] is None
    assert capsys.readouterr().err.strip().splitlines()[-2:] == [
        "warning: val/minFDE6 was NaN or inf in every validation round, so the best checkpoint was not chosen on it",
        f"warning: the cache is damaged: {shard / 'positions.npy'} holds 40 NaN/inf values (scenario {scenario}), "
        f"values that preprocessing never writes; delete {shard} (the next run caches the scenarios again from the "
        "data root)",
    ]
    # `fpeft runs`: no best value, and the last round's NaN (it showed '-', as for a run never validated)
    assert main(["runs", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert f"| {tmp_path / 'val'} | tune ft | tiny | {root} | 2/2 | - | - | nan |" in table
    assert re.search(
        rf"\| {re.escape(str(tmp_path / 'again'))} \| .* \| 1/1 \| \d+\.\d+ val/minFDE6 \| 0 \| \d+\.\d+ \|", table
    )


def test_nan_forecasts_of_a_damaged_cache_are_named_by_eval_and_left_out_of_a_submission(
    tuned, synth_root, tmp_path, capsys
):
    """NaN inputs (a cache shard whose bytes changed) gave NaN forecasts: eval printed NaN means
    without a word why, and predict failed with av2's traceback."""
    from av2.datasets.motion_forecasting.eval.submission import ChallengeSubmission

    from forecast_peft.data.cache import load_shard

    root = tmp_path / "data"
    for part in ("val", "cache"):
        shutil.copytree(synth_root / part, root / part)
    shard = root / "cache" / "val" / "shard-00000"
    loaded = load_shard(shard)
    ids = loaded.meta["scenario_id"]
    assert _damage_fourth_focal_track(shard) == ids[3]
    ckpt = tuned["ft"]["best"]
    common = [f"data.root={root}", "data.num_workers=0"]
    damage = (
        f"warning: the cache is damaged: {shard / 'positions.npy'} holds 40 NaN/inf values (scenario {ids[3]}), "
        f"values that preprocessing never writes; delete {shard} (the next run caches the scenarios again from "
        "the data root)"
    )
    assert main(["eval", "-c", ckpt, *common, f"out={tmp_path / 'eval'}"]) == 0
    err = capsys.readouterr().err.splitlines()
    named = [line for line in err if line.startswith("warning: ")]
    assert re.fullmatch(
        rf"warning: ft \(.*\) forecast NaN or inf in 1 scenario of split 'val' \(scenario {ids[3]}\)", named[0]
    )
    assert named[1:] == [damage]  # the baselines forecast from the last steps alone: finite
    report = json.loads((tmp_path / "eval" / "report.json").read_text(), parse_constant=lambda word: pytest.fail(word))
    assert report[-1]["minFDE6"] is None and report[-1]["paired"]["diff"]["minFDE6"] is None
    assert report[-1]["MR6"] is not None and report[0]["minFDE6"] > 0  # MR6 counts the NaN scene a miss
    out = tmp_path / "sub.parquet"
    assert main(["predict", "-c", ckpt, *common, "--split", "val", "--out", str(out)]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]  # no progress bar
    assert err == [
        f"warning: {ckpt} forecast NaN or inf in 1 scenario of split 'val' (scenario {ids[3]})",
        damage,
        "warning: the submission leaves out 1 such scenario (av2 refuses NaN), and the leaderboard expects every "
        "scenario of the split",
    ]
    assert sorted(ChallengeSubmission.from_parquet(out).predictions) == sorted(ids[:3] + ids[4:])
    positions = np.load(shard / "positions.npy", mmap_mode="r+")
    positions[:, 45] = np.nan  # every track at step 45: every forecast NaN
    positions.flush()
    assert main(["predict", "-c", ckpt, *common, "--split", "val", "--out", str(tmp_path / "none.parquet")]) == 1
    err = capsys.readouterr().err
    assert f"fpeft: error: no submission written: {ckpt} forecast NaN or inf in every scenario" in err
    assert f"holds {2 * int(loaded.arrays['actor_offsets'][-1]) + 40:,} NaN/inf values" in err  # x and y of every row
    assert not (tmp_path / "none.parquet").exists()


def test_a_target_parameter_pretraining_that_diverges_stops_before_tuning(
    pretrained_ckpt, synth_root, tmp_path, capsys, monkeypatch
):
    """Tuning would start from its NaN weights. (The divergence is forced here: the tiny model's
    prompts and adapters grew huge but finite at every learning rate tried.)"""
    from forecast_peft.training import DivergenceStop

    def diverge(self, trainer, pl_module):  # as DivergenceStop does on a NaN epoch loss
        self.epoch, self.value = trainer.current_epoch, float("nan")
        trainer.should_stop = True

    monkeypatch.setattr(DivergenceStop, "on_train_epoch_end", diverge)
    run = tmp_path / "run"
    args = ["tune", "--mode", "peft", "--tpp-epochs", "3", "--pretrained", str(pretrained_ckpt), *TINY]
    assert main(args + [f"data.root={synth_root}", f"run_dir={run}", "trainer.max_epochs=2"]) == 1
    err = capsys.readouterr().err
    assert "fpeft: error: target-parameter pre-training: training diverged: train/epoch_loss was nan in epoch 0" in err
    assert (run / "tpp" / "checkpoints" / "last.ckpt").is_file() and not (run / "checkpoints").exists()
