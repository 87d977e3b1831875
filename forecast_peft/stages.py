"""Stages as plain functions of a composed config: the CLI and the tests both call them."""

from __future__ import annotations

from omegaconf import DictConfig

from forecast_peft.errors import NotBuiltError


def _not_built(stage: str) -> None:
    raise NotBuiltError(f"stage '{stage}' is not built yet")


def synth(cfg: DictConfig) -> list[str]:
    """Write synthetic AV2-format scenarios; returns their directories."""
    from forecast_peft.data.synth.generate import generate

    s = cfg.synth
    return generate(s.out, s.split, int(s.num_scenarios), int(s.seed), s.style, int(s.workers))


def preprocess(cfg: DictConfig):
    """Cache every split of ``data.root``; returns one summary per split."""
    from forecast_peft.data.preprocess import preprocess as run

    d = cfg.data
    return run(d.root, d.cache_dir, list(cfg.splits), int(d.preprocess_workers), int(d.shard_size))


def pretrain(cfg: DictConfig):
    _not_built("pretrain")


def tune(cfg: DictConfig):
    _not_built("tune")


def eval(cfg: DictConfig):  # noqa: A001 - the stage is called eval on the command line
    _not_built("eval")


def predict(cfg: DictConfig):
    _not_built("predict")


def viz(cfg: DictConfig):
    _not_built("viz")


def demo(cfg: DictConfig):
    _not_built("demo")
