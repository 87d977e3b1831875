"""Stages as plain functions of a composed config: the CLI and the tests both call them."""

from __future__ import annotations

from omegaconf import DictConfig

from forecast_peft.errors import NotBuiltError


def _not_built(stage: str) -> None:
    raise NotBuiltError(f"stage '{stage}' is not built yet")


def synth(cfg: DictConfig):
    _not_built("synth")


def preprocess(cfg: DictConfig):
    _not_built("preprocess")


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
