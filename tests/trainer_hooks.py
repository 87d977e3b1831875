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


def run_in_own_session(command: list[str], env: dict[str, str], failure: str, timeout: int = 240) -> tuple[int, str]:
    """Run ``command`` (a script that calls fpeft's ``main`` after ``add_callback``) in a session of
    its own, so that a signal to its process group reaches its processes alone, with this test's
    module path; returns its exit code and stderr. After ``timeout`` seconds it stops them with
    SIGABRT, on which Python's fault handler (``PYTHONFAULTHANDLER``) prints the stack of every
    thread of every process of the session (a two-process run hung once in a whole-suite run and
    never alone), and fails the test with ``failure`` and those stacks."""
    import os
    import signal
    import subprocess
    import sys
    from contextlib import suppress

    import pytest

    env = {**env, "PYTHONPATH": os.pathsep.join(sys.path), "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGABRT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # a process that ignores SIGABRT holds the pipes open
            err = ""
        with suppress(ProcessLookupError):  # what is left of the session
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{failure}; its processes' stacks when stopped:\n{err[-8000:]}")
    return proc.returncode, err
