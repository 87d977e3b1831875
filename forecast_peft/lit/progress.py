"""The training progress bar (no omegaconf or hydra here: benchmarks import it on machines without them)."""

from __future__ import annotations

import time

from pytorch_lightning.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """Lightning's progress bar, moved on every training step, that shows the training loss read
    at most once per ``metrics_interval_s`` seconds and at the end of each epoch. Values logged
    with ``prog_bar=True`` are read back to the host (``.item()``) after every step, which makes
    the host wait for the GPU so the next step's work is not queued while the GPU runs; so the
    modules log the training loss without it, and this bar reads it from the callback metrics."""

    def __init__(self, metrics_interval_s: float = 1.0, show: tuple[str, ...] = ("train/loss",)):
        super().__init__()
        self.metrics_interval_s = metrics_interval_s
        self.show = show
        self._metrics_at = float("-inf")

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        for key in self.show:
            value = trainer.callback_metrics.get(key)
            if value is not None:
                metrics[key] = float(value)
        return metrics

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        bar = self.train_progress_bar
        n = batch_idx + 1
        if bar is None or not self._should_update(n, bar.total):
            return
        bar.update(n - bar.n)
        now = time.monotonic()
        if now - self._metrics_at >= self.metrics_interval_s:
            self._metrics_at = now
            bar.set_postfix(self.get_metrics(trainer, pl_module))
