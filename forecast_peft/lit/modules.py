"""LightningModules: they own losses, metrics, logging and the optimiser; the network comes from
forecast_peft.models. Every checkpoint rebuilds its model from its hyper-parameters alone."""

from __future__ import annotations

import warnings

import pytorch_lightning as pl
import torch

from forecast_peft.constants import METRICS
from forecast_peft.lit.losses import forecast_losses
from forecast_peft.lit.optim import build_optimizer, follow_settings
from forecast_peft.metrics import ForecastMetrics
from forecast_peft.models.config import ModelConfig
from forecast_peft.models.forecaster import build_forecaster
from forecast_peft.models.mae import MAE_MASKS, MAEModel, sample_masks
from forecast_peft.peft.freeze import configure_peft, configure_tpp
from forecast_peft.peft.modules import PromptTokens, inject_adapters
from forecast_peft.runtime import say

# MAEModule samples its masks in this hook on purpose, whatever datamodule feeds it
warnings.filterwarnings("ignore", message=r"You have overridden `on_before_batch_transfer` in `LightningModule`")
# an epoch shorter than trainer.log_every_n_steps still logs its mean training loss (train/epoch_loss)
warnings.filterwarnings(
    "ignore", message=r"The number of training batches \(\d+\) is smaller than the logging interval"
)


STEPS_PER_EPOCH = "fpeft_steps_per_epoch"  # a checkpoint's: its fit's optimiser steps per epoch


def _batch_size(batch: dict) -> int:
    return int(batch["x"].shape[0])


class _Base(pl.LightningModule):
    stage = ""
    steps_per_epoch: float | None = None  # optimiser steps per epoch of this fit: its schedule's unit
    restored_steps_per_epoch: float | None = None  # those of the fit that wrote the checkpoint resumed from

    def configure_optimizers(self):
        total, epochs = int(self.trainer.estimated_stepping_batches), int(self.trainer.max_epochs)
        self.steps_per_epoch = total / max(1, epochs)
        return build_optimizer(self.model, self.hparams.optim, total, epochs)

    def on_train_start(self) -> None:
        # after Lightning restored a resumed run's optimiser and schedule from its checkpoint:
        # optim.lr / optim.weight_decay given with --resume apply from here on, as its config.yaml
        # says, and another batch size or training fraction keeps the schedule's epoch
        changed = follow_settings(
            self.trainer.optimizers[0],
            self.trainer.lr_scheduler_configs[0].scheduler,
            self.hparams.optim,
            (self.restored_steps_per_epoch, self.steps_per_epoch),
        )
        if changed:
            say(f"resumed with {', '.join(changed)}, from step {self.trainer.global_step} on")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["fpeft_stage"] = self.stage
        checkpoint[STEPS_PER_EPOCH] = self.steps_per_epoch

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.restored_steps_per_epoch = checkpoint.get(STEPS_PER_EPOCH)  # None in checkpoints written before

    def _log_train_loss(self, loss: torch.Tensor, batch: dict) -> None:
        """``train/loss`` every ``trainer.log_every_n_steps`` steps (lit.progress.StepProgressBar
        shows it: a prog_bar value would be read back to the host after every step), and
        ``train/epoch_loss``, the epoch's mean, in every epoch's log row however few batches an
        epoch has (a small downstream set may have fewer than the logging interval)."""
        n = _batch_size(batch)
        self.log("train/loss", loss, batch_size=n)
        self.log("train/epoch_loss", loss, batch_size=n, on_step=False, on_epoch=True, sync_dist=True)


class MAEModule(_Base):
    """Forecast-MAE pre-training; with ``tpp=True`` the PEFT prompts and adapters are attached and
    only they learn (target-parameter pre-training, backbone frozen)."""

    stage = "pretrain"

    def __init__(self, model_cfg: dict, optim: dict, tpp: bool = False):
        super().__init__()
        self.save_hyperparameters()
        cfg = ModelConfig.from_dict(model_cfg)
        self.model = MAEModel(cfg)
        if tpp:
            self.stage = "tpp"
            d, p = cfg.embed_dim, cfg.peft.num_prompts
            self.model.encoder.context_prompts = PromptTokens(cfg.encoder_depth, p, d)
            self.model.mode_prompts = PromptTokens(cfg.num_modes, p, d)
            inject_adapters(self.model, cfg.peft.adapter_rank)
            configure_tpp(self.model)

    def forward(self, batch: dict) -> dict:
        return self.model(batch)

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        # the masks' index sizes are read on the host here, so the step on the GPU never waits
        batch[MAE_MASKS] = sample_masks(batch, self.model.cfg.mae, pin=self.device.type == "cuda")
        return batch

    def _step(self, batch: dict, split: str) -> torch.Tensor:
        losses = self.model(batch)
        self.log_dict(
            {f"{split}/{k}": v for k, v in losses.items() if k != "loss"},
            batch_size=_batch_size(batch),
            sync_dist=split == "val",
        )
        if split == "val":
            self.log("val/loss", losses["loss"], batch_size=_batch_size(batch), prog_bar=True, sync_dist=True)
        else:
            self._log_train_loss(losses["loss"], batch)
        return losses["loss"]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")


class ForecastModule(_Base):
    """Forecasting in one of the tuning modes (peft, ft, baseline)."""

    stage = "tune"

    def __init__(self, model_cfg: dict, mode: str, optim: dict):
        super().__init__()
        self.save_hyperparameters()
        self.cfg = ModelConfig.from_dict(model_cfg)
        self.mode = mode
        self.model = build_forecaster(self.cfg, mode)
        if mode == "peft":
            configure_peft(self.model)
        self.val_metrics = ForecastMetrics()

    def forward(self, batch: dict) -> dict:
        return self.model(batch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = forecast_losses(self.model(batch), batch, self.cfg.reg_weight)
        self.log_dict({f"train/{k}": v for k, v in losses.items() if k != "loss"}, batch_size=_batch_size(batch))
        self._log_train_loss(losses["loss"], batch)
        return losses["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self.model(batch)
        losses = forecast_losses(out, batch, self.cfg.reg_weight)
        self.log("val/loss", losses["loss"], batch_size=_batch_size(batch), sync_dist=True)
        self.val_metrics.update(out["y_hat"], out["pi"], batch["y"][:, 0])

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        for name in METRICS:
            # the same on every process (torchmetrics reduces its states); sync_dist averages equal values
            self.log(f"val/{name}", values[name], prog_bar=name == "minFDE6", sync_dist=True)
        self.val_metrics.reset()
