"""Tests' way into the trainers that the stages build."""

import re

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
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # a process that ignores SIGABRT holds the pipes open
            out, err = "", ""
        with suppress(ProcessLookupError):  # what is left of the session
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(
            f"{failure}; its processes' stacks when stopped:\n{_without_module_lists(err)[-8000:]}\n"
            f"its last output: {out[-1000:]}"
        )
    return proc.returncode, err


# the fault handler prints, after the stacks (Python 3.11 on), the list of the extension modules
# loaded: two processes' lists filled the last 8000 characters of a hang's report and left none of
# the stacks (session 34). A line of one, or a piece of one, holds module names and nothing else.
_TOTAL = re.compile(r"\(total: \d+\)$")
_MODULE = re.compile(r"[\w.]*")


def _is_module_list(line: str) -> bool:
    listed = "," in line or "Extension modules:" in line or _TOTAL.search(line.strip())  # not a word alone
    rest = _TOTAL.sub("", line.strip().removeprefix("Extension modules:")).strip()
    return bool(listed) and all(_MODULE.fullmatch(item.strip()) for item in rest.split(","))


def _without_module_lists(err: str) -> str:
    return "\n".join(line for line in err.splitlines() if not _is_module_list(line))
