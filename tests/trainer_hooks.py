"""Tests' way into the trainers that the stages build."""

import os
import re
import signal
import subprocess
import sys
import time
from contextlib import suppress

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
    module path; returns its exit code and stderr. After ``timeout`` seconds it fails the test
    with ``failure`` and where each process of the session waited (``_stacks_one_by_one``)."""
    import pytest  # not at the top: the launched fpeft scripts import this module too

    env = {**env, "PYTHONPATH": os.pathsep.join(sys.path), "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        stacks = _stacks_one_by_one(proc, _text(expired.stderr))
        with suppress(ProcessLookupError):  # what is left of the session
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(
            f"{failure}; its processes' stacks when stopped:\n{stacks[-40000:]}\nits last output: {out[-1000:]}"
        )
    return proc.returncode, err


def _stacks_one_by_one(proc, err: str) -> str:
    """Stop the processes of ``proc``'s session with SIGABRT one at a time, and wait for each
    one's stacks before the next: Python's fault handler (``PYTHONFAULTHANDLER``) prints the stack
    of every thread of a process on SIGABRT. Two processes stopped at once wrote to the one pipe
    together, their lines cut into each other (session 35). All of them are first frozen
    (SIGSTOP), and each is let go (SIGCONT) only to take its SIGABRT, so that none reacts to the
    end of another (a process whose DataLoader worker died raised and ended, and the first
    process then lost the second, before their turn); the deepest (the workers) go first.
    Returns a section per process, headed by its pid, parent and command; ``err``: the stderr
    read before."""
    processes = sorted(_session_processes(proc.pid), key=lambda p: -p[2])
    for pid, *_ in processes:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    sections = []
    for pid, ppid, depth, args in processes:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGABRT)
            os.kill(pid, signal.SIGCONT)
        before = len(err)
        err = _read_until_quiet(proc, err)
        stacks = "\n".join(line for line in err[before:].splitlines() if not _is_module_list(line))
        sections.append(f"--- process {pid} (parent {ppid}, depth {depth}): {args[:300]}\n{stacks}")
    return "\n".join(sections)


def _read_until_quiet(proc, err: str, quiet: float = 1.0, limit: float = 20.0) -> str:
    """The stderr of ``proc`` read so far (``err``, and more), once nothing more has come for
    ``quiet`` seconds (or after ``limit``), or once its pipes closed."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        try:
            _, all_err = proc.communicate(timeout=quiet)
        except subprocess.TimeoutExpired as expired:
            more = _text(expired.stderr)
            if len(more) == len(err):
                return err
            err = more
        else:
            return all_err
    return err


def _text(output) -> str:
    """What ``TimeoutExpired`` holds of a text-mode pipe: the bytes read so far, or None."""
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def _session_processes(sid: int) -> list[tuple[int, int, int, str]]:
    """The processes of session ``sid``: (pid, parent pid, depth below the session's leader, command line)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # it ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after the command's name, which may hold spaces
        if int(fields[3]) == sid:  # state, ppid, pgrp, session
            found[int(entry)] = (int(fields[1]), args)

    def depth(pid: int) -> int:
        return 0 if found[pid][0] not in found else 1 + depth(found[pid][0])

    return [(pid, ppid, depth(pid), args) for pid, (ppid, args) in found.items()]


# the fault handler prints, after the stacks (Python 3.11 on), the list of the extension modules
# loaded: two processes' lists filled the last 8000 characters of a hang's report and left none of
# the stacks (session 34). A line of one, or a piece of one, holds module names and nothing else.
_TOTAL = re.compile(r"\(total: \d+\)$")
_MODULE = re.compile(r"[\w.]*")


def _is_module_list(line: str) -> bool:
    listed = "," in line or "Extension modules:" in line or _TOTAL.search(line.strip())  # not a word alone
    rest = _TOTAL.sub("", line.strip().removeprefix("Extension modules:")).strip()
    return bool(listed) and all(_MODULE.fullmatch(item.strip()) for item in rest.split(","))
