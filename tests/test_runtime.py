"""keep_freed_memory: glibc malloc keeps freed memory, unless the user chose otherwise."""

from __future__ import annotations

import ctypes.util
import sys

import pytest

from forecast_peft import runtime

GLIBC = sys.platform.startswith("linux") and "libc.so.6" in (ctypes.util.find_library("c") or "")


@pytest.fixture
def clean_env(monkeypatch):
    for key in list(runtime.os.environ):
        if key.startswith("MALLOC_") or key in ("LD_PRELOAD", runtime.OPT_OUT):
            monkeypatch.delenv(key)
    return monkeypatch


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_applies_on_glibc(clean_env):
    assert runtime._apply() is True


@pytest.mark.parametrize(
    "key, value", [(runtime.OPT_OUT, "1"), ("MALLOC_ARENA_MAX", "2"), ("LD_PRELOAD", "/usr/lib/libjemalloc.so")]
)
def test_leaves_malloc_alone_when_the_user_chose(clean_env, key, value):
    clean_env.setenv(key, value)
    assert runtime._apply() is False


def test_opting_out_with_zero_means_not_opting_out(clean_env):
    clean_env.setenv(runtime.OPT_OUT, "0")
    assert runtime._apply() is GLIBC


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_into_a_log_is_a_line_per_interval_and_the_last_where_the_bar_ends():
    """A bar redrawn in place (carriage returns) piles up in a log file as one ever longer line:
    ProgressLines writes a status as a line at most once an interval, holds the rest back, writes
    the last held one where the bar ends (tqdm's newline), and drops what clears the line."""
    import io

    out = io.StringIO()
    lines = runtime.ProgressLines(out)
    clock = lines.clock = Clock()
    lines.written_at = 0.0
    lines.write("\rwork:   0%")  # within the interval: held
    clock.now = 10.0
    lines.write("\rwork:  10%")
    assert out.getvalue() == ""
    clock.now = runtime.LOG_LINE_INTERVAL_S + 1
    lines.write("\rwork:  40%")  # an interval after the bar began
    lines.write("\r          \r")  # tqdm.write clearing the line for a message: not the end
    lines.write("\rwork:  50%")  # within the interval again: held
    assert out.getvalue() == "work:  40%\n"
    lines.write("\n")  # the bar's end
    lines.write("\n")  # nothing held: nothing more
    assert out.getvalue() == "work:  40%\nwork:  50%\n"


def test_a_bar_into_a_log_file_says_its_work_in_one_line_and_on_a_terminal_is_tqdm_s():
    import io

    log = io.StringIO()
    for _ in runtime.progress_bar(range(5), desc="preprocess val", unit="scn", file=log, leave=False):
        pass
    (line,) = log.getvalue().splitlines()  # kept at its end although leave=False
    assert line.startswith("preprocess val: 100%|") and "5/5" in line and "\r" not in log.getvalue()

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    for _ in runtime.progress_bar(range(5), desc="preprocess val", file=terminal, leave=False):
        pass
    assert terminal.getvalue().startswith("\rpreprocess val:   0%|")  # redrawn in place
    assert runtime.on_terminal(terminal) and not runtime.on_terminal(log)


def test_training_into_a_log_says_its_steps_and_each_epoch_s_values_in_lines(monkeypatch):
    """TrainingLines, Lightning's progress for a log file: a line per interval within an epoch
    (step, rate, time left, training loss) and during validation, and one at each epoch's end."""
    import io
    from types import SimpleNamespace

    import torch

    from forecast_peft.lit import progress

    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    out = io.StringIO()
    bar = progress.TrainingLines(interval_s=30.0, stream=out)
    metrics = {
        "train/loss": torch.tensor(2.5),
        "train/epoch_loss": torch.tensor(2.25),
        "val/minFDE6": torch.tensor(7.5),
    }
    trainer = SimpleNamespace(
        current_epoch=3,
        callback_metrics={"train/loss": metrics["train/loss"]},
        sanity_checking=False,
        num_training_batches=400,
        max_epochs=60,
        max_steps=-1,
        num_val_batches=[50],
    )
    bar._trainer = trainer
    bar.on_train_epoch_start(trainer, None)
    for step in range(400):
        clock.now = (step + 1) * 0.25  # 4 steps a second
        bar.on_train_batch_end(trainer, None, None, None, step)
    clock.now += 19.0  # 29 s after the last line
    bar.on_validation_batch_end(trainer, None, None, None, 0)  # within the interval: nothing
    clock.now += 1.0
    bar.on_validation_batch_end(trainer, None, None, None, 1)
    bar.on_validation_end(trainer, None)
    trainer.callback_metrics = metrics
    bar.on_train_epoch_end(trainer, None)
    assert out.getvalue().splitlines() == [
        "epoch 3: step 120/400 (30%), 4.00 steps/s, 1:10 left, train/loss 2.5",
        "epoch 3: step 240/400 (60%), 4.00 steps/s, 40 s left, train/loss 2.5",
        "epoch 3: step 360/400 (90%), 4.00 steps/s, 10 s left, train/loss 2.5",
        "epoch 3: validation batch 2/50",
        "epoch 3 done in 2:00: train/epoch_loss 2.25, val/minFDE6 7.5",
    ]
    # an epoch that does not validate: Lightning still holds the last validation's values
    trainer.current_epoch = 4
    bar.on_train_epoch_start(trainer, None)
    clock.now += 5.0
    bar.on_train_epoch_end(trainer, None)
    assert out.getvalue().splitlines()[-1] == "epoch 4 done in 5 s: train/epoch_loss 2.25"
    bar.disable()  # another process of a multi-process run
    bar.on_train_epoch_end(trainer, None)
    assert len(out.getvalue().splitlines()) == 6
    assert runtime.format_duration(3 * 3600 + 12 * 60 + 5) == "3:12:05"
