"""Print the lowest version of every dependency that pyproject.toml allows, as pip requirements
(``numpy==1.24``), for ``make test-min-deps``, and of the packages of its ``dev`` extra that the
tests import (tensorboardX: without it the test of ``tensorboard=true`` skipped), pytest,
pytest-xdist and the linter left to the Makefile. torch is left out: the Makefile installs the
build it pins. A bound other than ``>=`` is kept as it is written."""

from __future__ import annotations

import re
import sys
from pathlib import Path


def dependencies(pyproject: str) -> list[str]:
    """The requirement strings of pyproject.toml's ``dependencies`` list (``"numpy>=1.24"``)."""
    block = re.search(r"^dependencies = \[(.*?)^\]", pyproject, re.S | re.M)
    if block is None:
        raise SystemExit("pyproject.toml: no dependencies list")
    return re.findall(r'"([^"]+)"', block.group(1))


def dev_dependencies(pyproject: str) -> list[str]:
    """The requirement strings of the ``dev`` extra that the tests import, pytest, its pytest-xdist
    and ruff aside."""
    block = re.search(r"^dev = \[(.*?)\]", pyproject, re.M)
    if block is None:
        raise SystemExit("pyproject.toml: no dev extra")
    specs = re.findall(r'"([^"]+)"', block.group(1))
    return [spec for spec in specs if requirement_name(spec) not in ("pytest", "pytest-xdist", "ruff")]


def requirement_name(spec: str) -> str:
    """The distribution a requirement string names: ``pytorch-lightning`` of ``pytorch-lightning>=2.4``."""
    return re.match(r"[A-Za-z0-9_.-]+", spec).group(0)


def lowest_requirements(pyproject: str, dev: bool = False) -> list[str]:
    """Pins of the dependencies at their floors; with ``dev``, of ``dev_dependencies`` too."""
    pins = []
    for spec in dependencies(pyproject) + (dev_dependencies(pyproject) if dev else []):
        name = requirement_name(spec)
        if name == "torch":
            continue
        floor = re.search(r">=\s*([0-9][^,\s]*)", spec)
        pins.append(f"{name}=={floor.group(1)}" if floor else spec)
    return pins


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml")
    print("\n".join(lowest_requirements(path.read_text(), dev=True)))
