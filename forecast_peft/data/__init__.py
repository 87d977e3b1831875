"""Data: raw AV2 reading (the only place importing av2), the packed cache, datasets, synthesis."""

from __future__ import annotations

from pathlib import Path

# the orders of ``data.eval_order`` (unshuffled batches: of scenes of about one size, or in cache
# order) and ``data.train_order`` (a plain shuffle, or ``dataset.BucketSampler``'s); here, where the
# configuration checks read them without importing torch
EVAL_ORDERS = ("size", "dataset")
TRAIN_ORDERS = ("random", "bucket")


def extract(path: str | Path, split: str = "val") -> dict:
    """Forecast-MAE features of one AV2 scenario; see ``forecast_peft.data.av2_reader.extract``.

    Imported lazily so that training code can import ``forecast_peft.data`` without av2.
    """
    from forecast_peft.data.av2_reader import extract as _extract

    return _extract(path, split)
