"""Training and evaluation under Lightning's DDP with two CPU processes (gloo)."""

import pytest
import pytorch_lightning as pl

from forecast_peft import config, stages
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
