"""Tests' way into the trainers that the stages build."""

from forecast_peft import training


def add_callback(make_callback, setattr=setattr):
    """Have every trainer of ``training.make_trainer`` also hold ``make_callback()``; ``setattr``:
    pytest's ``monkeypatch.setattr`` to undo it after the test. Returns the real ``make_trainer``."""
    real = training.make_trainer

    def make_trainer(*args, **kwargs):
        trainer, checkpoint = real(*args, **kwargs)
        trainer.callbacks.append(make_callback())
        return trainer, checkpoint

    setattr(training, "make_trainer", make_trainer)
    return real
