"""Training and evaluation under Lightning's DDP with two CPU processes (gloo)."""

import os
import subprocess
import sys

import pytest
import pytorch_lightning as pl

from forecast_peft import config, stages
from forecast_peft.config import RUN_DIR_ENV
from forecast_peft.data.datamodule import ForecastDataModule
from tests.conftest import TINY


def _validate(module, cfg, devices: int) -> dict:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    (metrics,) = trainer.validate(module, datamodule=ForecastDataModule(cfg.data), verbose=False)
    return metrics


def test_two_process_training_and_metrics(synth_root, tmp_path):
    run = tmp_path / "ddp"
    cfg = config.compose(
        "tune",
        TINY
        + [
            f"data.root={synth_root}",
            "mode=ft",
            "trainer.max_epochs=1",
            "trainer.devices=2",
            "trainer.strategy=ddp_spawn",
            f"run_dir={run}",
        ],
    )
    result = stages.tune(cfg)
    module, _ = stages.load_tuned(result["last"])
    single = _validate(module, cfg, devices=1)
    double = _validate(module, cfg, devices=2)
    for name in ("val/minADE6", "val/minFDE6", "val/MR6", "val/brier-minFDE6", "val/minFDE1"):
        assert double[name] == pytest.approx(single[name], rel=1e-5), name


def test_a_launched_multi_gpu_run_writes_one_run_directory(synth_root, tmp_path):
    """Lightning's own launcher (strategy ddp) starts the second process as a new `fpeft`
    command, seconds later: it must not create a run directory of its own time stamp."""
    runs = tmp_path / "runs"
    command = [sys.executable, "-m", "forecast_peft", "pretrain", *TINY, f"data.root={synth_root}"]
    command += ["trainer.max_epochs=1", "trainer.devices=2", "trainer.strategy=ddp", f"runs_root={runs}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "SLURM_PROCID", RUN_DIR_ENV)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = (runs / "pretrain").iterdir()
    assert (run / "checkpoints" / "last.ckpt").exists() and (run / "config.yaml").exists()


def test_only_the_first_process_creates_the_run_directory(tmp_path, monkeypatch):
    for key in ("RANK", "SLURM_PROCID", RUN_DIR_ENV):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    first = config.make_run_dir(config.compose("pretrain", [f"run_dir={tmp_path / 'first'}"]))
    assert (first / "config.yaml").exists() and os.environ[RUN_DIR_ENV] == str(first)
    monkeypatch.setenv("LOCAL_RANK", "1")  # a process Lightning started: the first one's directory
    assert config.make_run_dir(config.compose("pretrain", [f"run_dir={tmp_path / 'other'}"])) == first
    config.check_run_dir(config.compose("pretrain", [f"run_dir={first}"]))  # the same run_dir=: not refused
    monkeypatch.delenv(RUN_DIR_ENV)
    monkeypatch.setenv("SLURM_PROCID", "3")  # started by srun: its own name, nothing created
    monkeypatch.delenv("LOCAL_RANK")
    assert config.make_run_dir(config.compose("pretrain", [f"run_dir={tmp_path / 'srun'}"])) == tmp_path / "srun"
    assert not (tmp_path / "srun").exists()


def test_only_the_first_process_says_what_a_stage_does(monkeypatch, capsys):
    from forecast_peft.runtime import say

    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    say("data: 24 training scenarios")
    monkeypatch.setenv("LOCAL_RANK", "1")  # the second process of Lightning's own launcher
    say("data: 24 training scenarios")
    assert capsys.readouterr().out == "data: 24 training scenarios\n"
