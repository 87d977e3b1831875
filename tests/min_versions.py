"""Print the lowest version of every dependency that pyproject.toml allows, as pip requirements
(``numpy==1.24``), for ``make test-min-deps``. torch is left out: the Makefile installs the
build it pins. A bound other than ``>=`` is kept as it is written."""

from __future__ import annotations

import re
import sys
from pathlib import Path


def lowest_requirements(pyproject: str) -> list[str]:
    block = re.search(r"^dependencies = \[(.*?)^\]", pyproject, re.S | re.M)
    if block is None:
        raise SystemExit("pyproject.toml: no dependencies list")
    pins = []
    for spec in re.findall(r'"([^"]+)"', block.group(1)):
        name = re.match(r"[A-Za-z0-9_.-]+", spec).group(0)
        if name == "torch":
            continue
        floor = re.search(r">=\s*([0-9][^,\s]*)", spec)
        pins.append(f"{name}=={floor.group(1)}" if floor else spec)
    return pins


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml")
    print("\n".join(lowest_requirements(path.read_text())))
