"""The Makefile's check of the Python it was given, run by make on stand-ins for Python (scripts
that print a version) and an environment that is already installed, so nothing is installed."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _python(path: Path, version: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho {version}\n")
    path.chmod(0o755)
    return path


def _make(*args: str) -> subprocess.CompletedProcess:
    # not the variables of a make that runs these tests (make test PYTHON=...): they would reach this one
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(["make", "-s", "-C", str(ROOT), *args], capture_output=True, text=True, env=env, timeout=60)


def test_a_python_given_beside_an_environment_of_another_python_stops_in_one_line(tmp_path):
    """``make test PYTHON=python3.12`` in a checkout whose .venv was made by Python 3.11 ran the
    tests on 3.11 and said nothing; now it stops and says how to get an environment of 3.12."""
    venv = tmp_path / "venv"
    _python(venv / "bin" / "python", "3.11")
    (venv / ".installed").touch()  # installed after pyproject.toml was written: nothing to install
    other = _python(tmp_path / "python3.12", "3.12")
    done = _make("install", f"PYTHON={other}", f"VENV={venv}")
    assert done.returncode != 0
    assert done.stderr.splitlines()[0] == (
        f"make: {venv} holds Python 3.11, not {other}'s 3.12: add VENV=.venv-3.12 for an environment of its own, "
        f"or remove {venv}"
    )
    missing = _make("install", f"PYTHON={tmp_path / 'none'}", f"VENV={venv}")
    assert (
        missing.returncode != 0 and missing.stderr.splitlines()[0] == f"make: PYTHON={tmp_path / 'none'} does not run"
    )
    same = _python(tmp_path / "python3.11", "3.11")
    assert _make("install", f"PYTHON={same}", f"VENV={venv}").returncode == 0
    assert _make("install", f"VENV={venv}").returncode == 0  # PYTHON not given: the environment is used as it is
