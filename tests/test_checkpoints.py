from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from forecast_peft import config, stages
from forecast_peft.checkpoints import (
    PRETRAINED_KEY_MAP,
    check_compatible,
    load_checkpoint,
    load_pretrained,
    model_state,
    peft_added_names,
    transfer,
)
from forecast_peft.data.dataset import ForecastDataset
from forecast_peft.errors import UserError
from forecast_peft.lit.modules import ForecastModule, MAEModule
from forecast_peft.models.config import ModelConfig
from forecast_peft.peft.export import apply_adapter
from tests.conftest import TINY


def _tiny_cfg(ckpt) -> dict:
    return ckpt["hyper_parameters"]["model_cfg"]


@pytest.mark.parametrize("mode", ["peft", "ft", "baseline"])
def test_every_pretrained_tensor_transfers(pretrained_ckpt, mode):
    ckpt = load_checkpoint(pretrained_ckpt)
    module = ForecastModule(
        _tiny_cfg(ckpt), mode, {"lr": 1e-3, "weight_decay": 0.0, "warmup_epochs": 1, "min_lr": 1e-6}
    )
    n = load_pretrained(ckpt, module.model, mode)
    src = model_state(ckpt)
    expected = sum(1 for k in src for sp, _ in PRETRAINED_KEY_MAP[mode] if k.startswith(sp))
    assert n == expected > 0
    dst = module.model.state_dict()
    for sp, dp in PRETRAINED_KEY_MAP[mode]:
        for k, v in src.items():
            if k.startswith(sp):
                assert torch.equal(dst[dp + k[len(sp) :]], v), k


def test_mismatch_fails_loudly(pretrained_ckpt, tmp_path):
    ckpt = load_checkpoint(pretrained_ckpt)
    bigger = dict(_tiny_cfg(ckpt), embed_dim=48)
    with pytest.raises(UserError, match="incompatible sizes.*embed_dim 32 vs 48.*add model=tiny"):
        check_compatible(ckpt, ModelConfig.from_dict(bigger))
    unshipped = dict(_tiny_cfg(ckpt), embed_dim=48, agent=dict(_tiny_cfg(ckpt)["agent"], widths=[12, 24, 48]))
    torch.save({**ckpt, "hyper_parameters": {**ckpt["hyper_parameters"], "model_cfg": unshipped}}, tmp_path / "u.ckpt")
    with pytest.raises(UserError, match="set the checkpoint's sizes with model.<key>"):
        check_compatible(load_checkpoint(tmp_path / "u.ckpt"), ModelConfig.from_dict(_tiny_cfg(ckpt)))
    module = ForecastModule(bigger, "ft", {"lr": 1e-3, "weight_decay": 0.0, "warmup_epochs": 1, "min_lr": 1e-6})
    with pytest.raises(UserError, match="incompatible sizes"):
        load_pretrained(ckpt, module.model, "ft")
    source = model_state(ckpt)
    source["encoder.unknown_tensor"] = torch.zeros(1)
    small = ForecastModule(_tiny_cfg(ckpt), "ft", {"lr": 1e-3, "weight_decay": 0.0, "warmup_epochs": 1, "min_lr": 1e-6})
    with pytest.raises(UserError, match="no place"):
        transfer(source, small.model, PRETRAINED_KEY_MAP["ft"], optional=peft_added_names(small.model))


def test_tuning_takes_the_pretrained_model(pretrained_ckpt, tmp_path):
    """A backbone pre-trained with model=tiny is tuned as tiny without model=tiny; the command's
    PEFT sizes stay on top, and a model the command picks itself is kept (and then refused)."""
    tiny = ModelConfig.from_dict(_tiny_cfg(load_checkpoint(pretrained_ckpt))).to_dict()
    cfg = config.compose("tune", [f"pretrained={pretrained_ckpt}"])
    assert ModelConfig.from_dict(OmegaConf.to_container(cfg.model)).to_dict() == tiny
    cfg = config.compose("tune", [f"pretrained={pretrained_ckpt}", "model.peft.adapter_rank=3"])
    assert cfg.model.peft.adapter_rank == 3 and cfg.model.embed_dim == tiny["embed_dim"]
    picked = config.compose("tune", [f"pretrained={pretrained_ckpt}", "model=small"])
    assert picked.model.embed_dim != tiny["embed_dim"]
    with pytest.raises(UserError, match="incompatible sizes.*add model=tiny"):
        check_compatible(load_checkpoint(pretrained_ckpt), ModelConfig.from_dict(OmegaConf.to_container(picked.model)))
    with pytest.raises(UserError, match="does not exist"):
        config.compose("tune", [f"pretrained={tmp_path / 'missing.ckpt'}"])


def test_wrong_stage_and_garbage(pretrained_ckpt, tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"garbage")  # torch's words: "invalid literal for int() with base 10: 'arbage\n'"
    with pytest.raises(UserError, match="bad.ckpt: not a readable checkpoint \\(not in either of torch.save's formats"):
        load_checkpoint(bad)
    # a copy or a save that did not finish: torch's own words were "OSError: [Errno 22] Invalid
    # argument" and "EOFError: Ran out of input"
    bad.write_bytes(pretrained_ckpt.read_bytes()[:5000])
    with pytest.raises(UserError, match="bad.ckpt: not a readable checkpoint \\(cut short at 5,000 bytes: a copy"):
        load_checkpoint(bad)
    bad.write_bytes(b"")
    with pytest.raises(UserError, match="bad.ckpt: not a readable checkpoint \\(an empty file: a copy or a save"):
        load_checkpoint(bad)
    tune_it = f"\\(tune this one: `fpeft tune --pretrained {pretrained_ckpt} "
    with pytest.raises(UserError, match=f"cannot be used for forecasting; forecasts come .* {tune_it}"):
        stages.load_tuned(pretrained_ckpt)


def test_tpp_keeps_the_backbone_bit_identical(pretrained_ckpt, synth_root, tmp_path):
    from forecast_peft.data.datamodule import ForecastDataModule

    cfg = config.compose("tune", TINY + [f"data.root={synth_root}", "tpp_epochs=1"])
    base = load_checkpoint(pretrained_ckpt)
    model = stages._target_parameter_pretraining(cfg, base, tmp_path, _tiny_cfg(base), ForecastDataModule(cfg.data))
    after = model.state_dict()
    changed = 0
    for k, v in model_state(base).items():
        assert torch.equal(after[k], v), k
    peft_names = [n for n, p in model.named_parameters() if p.requires_grad]
    fresh = MAEModule(_tiny_cfg(base), {"lr": 1e-3, "weight_decay": 0.0, "warmup_epochs": 1, "min_lr": 1e-6}, tpp=True)
    for n in peft_names:
        changed += not torch.equal(after[n], fresh.model.state_dict()[n])
    assert peft_names and changed > 0


def test_adapter_export_reproduces_predictions(pretrained_ckpt, synth_root, tmp_path):
    # other PEFT sizes than the pre-training run's (tiny: 4 prompts, rank 8): they belong to tuning
    cfg = config.compose(
        "tune",
        TINY
        + [
            f"data.root={synth_root}",
            "mode=peft",
            f"pretrained={pretrained_ckpt}",
            "model.peft.num_prompts=3",
            "model.peft.adapter_rank=5",
            "trainer.max_epochs=1",
            f"run_dir={tmp_path / 'run'}",
        ],
    )
    result = stages.tune(cfg)
    tuned, _ = stages.load_tuned(result["best"])
    assert tuned.model.mode_prompts.tokens.shape[1] == 3
    rebuilt = apply_adapter(result["adapter"])
    batch = ForecastDataset(synth_root / "cache", "val").__getitems__(list(range(6)))
    with torch.no_grad():
        a, b = tuned.model(batch), rebuilt(batch)
    assert torch.equal(a["y_hat"], b["y_hat"]) and torch.equal(a["pi"], b["pi"])
    size = (tmp_path / "run" / "adapter" / "adapter.safetensors").stat().st_size
    assert 0 < size < (tmp_path / "run" / "checkpoints" / "last.ckpt").stat().st_size / 2


def test_eval_takes_an_adapter_export(pretrained_ckpt, synth_root, tmp_path, capsys):
    import json
    import shutil

    from forecast_peft.cli import main

    base = tmp_path / "base.ckpt"
    shutil.copy(pretrained_ckpt, base)
    overrides = ["mode=peft", f"pretrained={base}", "trainer.max_epochs=1", f"run_dir={tmp_path / 'run'}"]
    result = stages.tune(config.compose("tune", TINY + [f"data.root={synth_root}"] + overrides))
    out = tmp_path / "report"
    args = ["eval", "-c", result["best"], "-c", result["adapter"], "--out", str(out), f"data.root={synth_root}"]
    assert main(args + ["data.num_workers=0"]) == 0
    full, adapter = [r for r in json.loads((out / "report.json").read_text()) if r["name"].startswith("peft")]
    assert full["name"] == "peft (run)" and adapter["name"] == "peft (run: adapter)"
    assert full["checkpoint"].endswith("best-epoch000.ckpt") and adapter["checkpoint"].endswith("adapter")
    same = [k for k in full if k not in ("name", "checkpoint")]  # the same predictions, so the same figures
    assert {k: full[k] for k in same} == {k: adapter[k] for k in same} and adapter.keys() == full.keys()
    capsys.readouterr()
    base.unlink()  # an export whose base checkpoint is gone: one line naming both
    assert main(args + ["data.num_workers=0"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "adapter.json" in err and "base.ckpt does not exist" in err
    assert "--base" in err
    moved = tmp_path / "elsewhere" / "checkpoints"
    moved.mkdir(parents=True)
    shutil.copy(pretrained_ckpt, moved / "renamed.ckpt")  # found by content, in a folder given with --base
    assert main(args + ["data.num_workers=0", "--base", str(moved.parent)]) == 0
    again = [r for r in json.loads((out / "report.json").read_text()) if r["name"].startswith("peft")][1]
    assert again == adapter
    for stage, place in (("predict", tmp_path / "sub.parquet"), ("viz", tmp_path / "pics")):
        extra = ["--base", str(moved.parent), "--out", str(place), f"data.root={synth_root}", "data.num_workers=0"]
        assert main([stage, "-c", result["adapter"], *extra]) == 0 and place.exists(), stage
    capsys.readouterr()
    assert main(args + ["data.num_workers=0", "--base", result["last"]]) == 1  # another checkpoint's content
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"none given with --base has its content (sha256): {result['last']}" in err
    shutil.copy(pretrained_ckpt, base)
    weights = Path(result["adapter"]) / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated weights: one line naming the file
    assert main(args + ["data.num_workers=0"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{weights}: not readable adapter weights" in err


def test_last_ckpt_is_the_last_epoch_whatever_the_validation_value(tmp_path, monkeypatch):
    """Lightning 2.6 writes ModelCheckpoint's last.ckpt only when a top-k checkpoint is saved at
    the same step: with save_top_k=1 it was the best epoch's, so --resume went back to the best
    epoch and an eval of the "unbiased" last.ckpt scored the checkpoint chosen on validation.
    Here the validation value never improves after epoch 0, and the run trains 3 epochs, and
    again 2 more on --resume's checkpoint, with and without validation in every epoch."""
    import pytorch_lightning as pl
    import torch

    from forecast_peft import config
    from forecast_peft.training import checkpoint_paths, make_trainer

    class Constant(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            return (self.w - batch).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            self.log("val/minFDE6", 1.0)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.ones(4, 1), batch_size=2)

        def val_dataloader(self):
            return torch.utils.data.DataLoader(torch.ones(2, 1), batch_size=2)

    for every in (1, 2):
        run = tmp_path / f"every{every}"
        overrides = ["trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.max_epochs=3"]
        cfg = config.compose("tune", overrides + [f"trainer.check_val_every_n_epoch={every}", f"run_dir={run}"])
        trainer, _ = make_trainer(cfg, run, monitor="val/minFDE6")
        trainer.fit(Constant())
        last = run / "checkpoints" / "last.ckpt"
        assert torch.load(last, weights_only=False)["epoch"] == 2, every
        first_validated = f"best-epoch{every - 1:03d}.ckpt"  # the best: the value never improves after it
        assert [p.name for p in (run / "checkpoints").glob("best-*.ckpt")] == [first_validated]
        trainer, _ = make_trainer(cfg, run, monitor="val/minFDE6", max_epochs=5, resume=str(last))
        trainer.fit(Constant(), ckpt_path=str(last))
        assert torch.load(last, weights_only=False)["epoch"] == 4, every
        assert [p.name for p in (run / "checkpoints").glob("best-*.ckpt")] == [first_validated]
    # finished.json's paths are absolute, also for a run_dir given relative to the working folder
    monkeypatch.chdir(tmp_path)
    paths = checkpoint_paths(trainer.checkpoint_callback, Path("every2"))
    assert paths == {"best": str(run / "checkpoints" / first_validated), "last": str(last)}
