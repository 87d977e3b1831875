"""The training progress bar (no omegaconf or hydra here: benchmarks import it on machines without them)."""

from __future__ import annotations

import math
import sys
import time

from pytorch_lightning.callbacks import ProgressBar, TQDMProgressBar

from forecast_peft.runtime import LOG_LINE_INTERVAL_S, format_duration


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


class TrainingLines(ProgressBar):
    """Training's progress for a log file or a pipe (a batch job's output, `| tee`), where a bar
    redrawn in place piles up as one ever longer line: within an epoch a line at most every
    ``interval_s`` seconds (its step, rate, the time left and the training loss, read from the
    callback metrics as ``StepProgressBar`` reads it: no wait for the GPU), the same during a
    long validation, and a line at the end of each epoch with its time, mean training loss and
    validation values (where it validated: Lightning keeps the last ones in its callback metrics
    through the epochs that do not). The first process of a multi-process run alone writes them."""

    def __init__(self, interval_s: float | None = None, stream=None):
        super().__init__()
        self.interval_s = LOG_LINE_INTERVAL_S if interval_s is None else interval_s
        self.stream = stream
        self._enabled = True
        self._began = self._written = 0.0
        self._validated = False

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def _line(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)
        self._written = time.monotonic()

    def _due(self) -> bool:
        return self._enabled and time.monotonic() - self._written >= self.interval_s

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._began = self._written = time.monotonic()
        self._validated = False

    def on_validation_end(self, trainer, pl_module) -> None:
        self._validated = self._validated or not trainer.sanity_checking

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self._due():
            return
        done, total = batch_idx + 1, self.total_train_batches
        rate = done / max(time.monotonic() - self._began, 1e-9)
        of, share, left = "", "", ""
        if math.isfinite(total):  # an epoch of known length
            of, share = f"/{total:,}", f" ({100 * done / total:.0f}%)"
            left = f", {format_duration((total - done) / rate)} left"
        loss = trainer.callback_metrics.get("train/loss")
        loss = f", train/loss {float(loss):.4g}" if loss is not None else ""
        self._line(f"epoch {trainer.current_epoch}: step {done:,}{of}{share}, {rate:.2f} steps/s{left}{loss}")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        if trainer.sanity_checking or not self._due():
            return
        totals = trainer.num_val_batches
        total = totals[dataloader_idx] if isinstance(totals, list) else totals
        of = f"/{total:,}" if math.isfinite(total) else ""
        self._line(f"epoch {trainer.current_epoch}: validation batch {batch_idx + 1:,}{of}")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self._enabled:
            return
        values = {
            k: v
            for k, v in trainer.callback_metrics.items()
            if k == "train/epoch_loss" or (self._validated and k.startswith("val/"))
        }
        said = ", ".join(f"{k} {float(v):.4g}" for k, v in sorted(values.items()))
        took = format_duration(time.monotonic() - self._began)
        self._line(f"epoch {trainer.current_epoch} done in {took}" + (f": {said}" if said else ""))
