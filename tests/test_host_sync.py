"""No training or inference step makes the host wait for the GPU (checked on the CPU by recording
the operations that would, see tests/host_sync.py)."""

import pytest
import torch

from benchmarks.scenes import random_batch
from forecast_peft.data.dataset import ForecastDataset
from forecast_peft.lit.losses import best_modes, forecast_losses
from forecast_peft.lit.modules import ForecastModule, MAEModule
from forecast_peft.metrics import ForecastMetrics
from forecast_peft.models.mae import MAE_MASKS, sample_masks
from tests.host_sync import HostSyncs
from tests.test_models import tiny


@pytest.fixture(scope="module")
def batch(synth_root):
    return ForecastDataset(synth_root / "cache", "train").__getitems__(list(range(6)))


OPTIM = {"lr": 1e-3, "weight_decay": 1e-4, "warmup_epochs": 0, "min_lr": 1e-6}


def test_the_recorder_finds_what_synchronises():
    w = torch.randn(5, requires_grad=True)
    with HostSyncs() as rec:
        (w * 2).sum().backward()
    assert rec.found == []
    with HostSyncs() as rec:
        w.sum().item()
        _ = w[w > 0]
        _ = w[torch.tensor([0, 2])]
        torch.arange(3).repeat_interleave(torch.tensor([1, 2, 0]))
        if w.detach().max() > 10:
            pass
    assert rec.found == [
        "_local_scalar_dense",
        "index with a boolean mask",
        "lift_fresh",
        "lift_fresh",
        "repeat_interleave without output_size",
        "_local_scalar_dense",
    ]


def make_module(task: str):
    """A tiny LightningModule for ``task``: pretrain, tpp, peft, ft or baseline."""
    cfg = tiny().to_dict()
    if task in ("pretrain", "tpp"):
        return MAEModule(cfg, OPTIM, tpp=task == "tpp")
    return ForecastModule(cfg, task, OPTIM)


def host_batch(task: str, size: int = 6, seed: int = 0) -> dict:
    """An AV2-sized random batch on the host as a training step of ``task`` receives it: with its
    masks for pre-training (as ``MAEModule.on_before_batch_transfer`` adds them). Its slots are
    not rounded up (``data.slot_multiple=1``), so that batches of other sizes or seeds have other
    shapes, any numbers of slots."""
    batch = random_batch(size, seed, slot_multiple=1)
    if task in ("pretrain", "tpp"):
        batch[MAE_MASKS] = sample_masks(batch, tiny().mae)
    return batch


def forward_backward(module, batch: dict, winners: list | None = None) -> torch.Tensor:
    """Forward, loss and backward of ``module``'s network on ``batch``; returns the loss.
    ``winners``: a forecaster's winning modes are taken from it when it holds them, else
    appended to it (on the host), so that another device's run can score the same modes."""
    out = module.model(batch)
    if isinstance(module, MAEModule):
        loss = out["loss"]
    else:
        if winners is not None and not winners:
            winners.append(best_modes(out, batch).cpu())
        best = None if not winners else winners[0].to(out["y_hat"].device)
        loss = forecast_losses(out, batch, module.cfg.reg_weight, best)["loss"]
    loss.backward()
    return loss


@pytest.mark.parametrize("task", ["pretrain", "tpp", "peft", "ft", "baseline"])
def test_training_step_does_not_synchronise(batch, task):
    module = make_module(task).train()
    model = module.model
    if isinstance(module, MAEModule):  # Lightning hands it the batch on the host first
        batch = module.on_before_batch_transfer(dict(batch), 0)
    with HostSyncs() as rec:
        forward_backward(module, batch)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 5.0)
    assert rec.where == []
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("mode", ["peft", "baseline"])
def test_inference_and_metrics_do_not_synchronise(batch, mode):
    model = make_module(mode).model.eval()
    metrics = ForecastMetrics()
    with HostSyncs() as rec, torch.no_grad():
        out = model(batch)
        metrics.update(out["y_hat"], out["pi"], batch["y"][:, 0])
    assert rec.where == []
    assert int(metrics.count) == 6


def test_pretraining_step_without_host_masks_would_synchronise(batch):
    """The check above can fail: masks sampled on the device have data-dependent index sizes."""
    model = make_module("pretrain").model.train()
    with HostSyncs() as rec:
        model(batch)
    assert "nonzero" in rec.found


class _ProgBarModule(ForecastModule):
    """Logs its training loss with ``prog_bar=True``, as Lightning's examples do."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train/loss_shown", loss, prog_bar=True)
        return loss


def _fit_config(synth_root, tmp_path, steps: int, stage: str = "tune"):
    from forecast_peft import config
    from tests.conftest import TINY

    overrides = [o for o in TINY if not o.startswith("trainer.enable_progress_bar")] + [
        f"data.root={synth_root}",
        "data.batch_size=2",
        "trainer.enable_progress_bar=true",
        "trainer.log_every_n_steps=1000",
        "trainer.max_epochs=2",
        f"trainer.limit_train_batches={steps}",
        f"run_dir={tmp_path / str(steps)}",
    ]
    return config.compose(stage, overrides)


def _reads_per_fit(synth_root, tmp_path, steps: int, bar, module_cls=ForecastModule) -> int:
    """Values read back to the host during a 2-epoch fit of ``steps`` training steps per epoch."""
    from forecast_peft.data.datamodule import ForecastDataModule
    from forecast_peft.training import make_trainer

    folder = tmp_path / type(bar).__name__  # each fit a run directory of its own
    cfg = _fit_config(synth_root, folder, steps)
    torch.manual_seed(0)
    module = module_cls(tiny().to_dict(), "peft", OPTIM)
    trainer, _ = make_trainer(cfg, folder / str(steps), monitor="val/minFDE6")
    trainer.callbacks[:] = [c for c in trainer.callbacks if c is not trainer.progress_bar_callback] + [bar]
    # the optimiser reads its step counters, which live on the host whatever the model's device;
    # the best checkpoint reads the validation value when it improves (once per validation at
    # most, and how often depends on the run's course, not on its number of steps)
    with HostSyncs(ignore=("torch/optim/", "callbacks/model_checkpoint.py")) as rec:
        trainer.fit(module, datamodule=ForecastDataModule(cfg.data))
    assert trainer.global_step == 2 * steps
    return rec.found.count("_local_scalar_dense")


def test_training_loop_reads_back_per_epoch_not_per_step(synth_root, tmp_path):
    from pytorch_lightning.callbacks import TQDMProgressBar

    from forecast_peft.lit.progress import StepProgressBar

    # the bar shows the loss at the end of each epoch only here (a second's interval in use)
    few, many = (_reads_per_fit(synth_root, tmp_path, n, StepProgressBar(1e9)) for n in (2, 6))
    assert few == many
    # the check can fail: a value logged with prog_bar=True is read back after every step
    stock_few, stock_many = (_reads_per_fit(synth_root, tmp_path, n, TQDMProgressBar(), _ProgBarModule) for n in (2, 6))
    assert stock_many - stock_few >= 2 * (6 - 2)  # at least one read per step


class _SyncCheckedMAEModule(MAEModule):
    """Records, at each training step, whether the batch came with its masks and the
    host-synchronising operations of a forward pass on it."""

    def training_step(self, batch, batch_idx):
        self.found.append(MAE_MASKS in batch)
        with HostSyncs() as rec:
            self.model(batch)
        self.found.extend(rec.where)
        return super().training_step(batch, batch_idx)


def test_pretraining_fit_samples_masks_before_the_transfer(synth_root, tmp_path):
    from forecast_peft.data.datamodule import ForecastDataModule
    from forecast_peft.training import make_trainer

    cfg = _fit_config(synth_root, tmp_path, 2, "pretrain")
    module = _SyncCheckedMAEModule(tiny().to_dict(), OPTIM)
    module.found = []
    trainer, _ = make_trainer(cfg, tmp_path / "pretrain", monitor="val/loss")
    trainer.fit(module, datamodule=ForecastDataModule(cfg.data))
    assert trainer.global_step == 4
    assert module.found == [True] * 4
