"""Data: raw AV2 reading (the only place importing av2), the packed cache, datasets, synthesis."""

from __future__ import annotations

from pathlib import Path

# the choices of ``data.eval_order`` (unshuffled batches: of scenes of about one size, or in cache
# order), ``data.train_order`` (a plain shuffle, or ``dataset.BucketSampler``'s) and
# ``data.worker_start`` (how DataLoader workers start: ``datamodule.worker_context``); here, where
# the configuration checks read them without importing torch
EVAL_ORDERS = ("size", "dataset")
TRAIN_ORDERS = ("random", "bucket")
WORKER_STARTS = ("auto", "forkserver", "spawn", "fork")


def check_choices(data) -> None:
    """``data.eval_order``, ``data.train_order`` and ``data.worker_start`` of the data settings
    ``data`` (where given): one of their choices, else a one-line error. Checked when a command is
    composed, and again by the loaders, which benchmarks and tests make without one."""
    from forecast_peft.errors import ConfigError

    for key, choices in (("eval_order", EVAL_ORDERS), ("train_order", TRAIN_ORDERS), ("worker_start", WORKER_STARTS)):
        value = getattr(data, key, None)
        if value is not None and value not in choices:
            raise ConfigError(f"data.{key} must be one of {', '.join(choices)}, got {value!r}")


def check_split(split: str) -> None:
    """The split a writing stage (synth, convert) writes: one of AV2's, else a one-line error."""
    from forecast_peft.constants import SPLITS
    from forecast_peft.errors import UserError

    if split not in SPLITS:
        raise UserError(f"unknown split '{split}' (splits: {', '.join(SPLITS)})")


def extract(path: str | Path, split: str = "val") -> dict:
    """Forecast-MAE features of one AV2 scenario; see ``forecast_peft.data.av2_reader.extract``.

    Imported lazily so that training code can import ``forecast_peft.data`` without av2.
    """
    from forecast_peft.data.av2_reader import extract as _extract

    return _extract(path, split)
