"""What pyproject.toml promises: every package the code imports is a declared dependency (omegaconf
was imported and not declared), and ``make test-min-deps`` installs the lowest allowed version of
each one."""

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

from tests.min_versions import dependencies, lowest_requirements, requirement_name

ROOT = Path(__file__).resolve().parents[1]


def _declared() -> set[str]:
    specs = dependencies((ROOT / "pyproject.toml").read_text())
    return {requirement_name(spec).lower().replace("_", "-") for spec in specs}


def test_every_imported_package_is_a_declared_dependency():
    imported = set()
    for path in (ROOT / "forecast_peft").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"forecast_peft"}
    dists, declared = packages_distributions(), _declared()
    undeclared = {
        module: dists.get(module)
        for module in third_party
        if not {d.lower().replace("_", "-") for d in dists.get(module, [module])} & declared
    }
    assert not undeclared, f"imported but not in pyproject.toml's dependencies: {undeclared}"


def test_the_lowest_versions_pin_every_dependency_but_torch():
    pins = lowest_requirements((ROOT / "pyproject.toml").read_text())
    assert {pin.split("==")[0].lower() for pin in pins} == _declared() - {"torch"}
    assert "pytorch-lightning==2.4" in pins and all(re.fullmatch(r"[\w.-]+==[0-9][\w.]*", p) for p in pins)
    # with the dev extra's packages that the tests import (tensorboardX), not pytest or the linter
    with_dev = lowest_requirements((ROOT / "pyproject.toml").read_text(), dev=True)
    assert with_dev[: len(pins)] == pins and with_dev[len(pins) :] == ["tensorboardX==2.6"]


def test_every_config_group_is_packaged():
    """An installed (not editable) forecast-peft reads conf/ as the package forecast_peft.conf; a
    config group missing from ``packages`` has setuptools warn that it "would be ignored"."""
    text = (ROOT / "pyproject.toml").read_text()
    for folder in [ROOT / "conf", *(p for p in (ROOT / "conf").iterdir() if p.is_dir() and p.name != "__pycache__")]:
        if not any(folder.glob("*.yaml")):
            continue
        package = ".".join(("forecast_peft", *folder.relative_to(ROOT).parts))
        assert f'"{package}",' in text, f"{package} is not in [tool.setuptools] packages"
        assert f'"{package}" = ["*.yaml"]' in text, f"{package} has no package-data entry"


def test_every_code_package_and_its_data_files_are_packaged():
    """Each folder of forecast_peft with Python in it is a listed package (an installed
    forecast-peft lacked it otherwise), and the files besides Python there (the C++ runner's
    source) its package data."""
    text = (ROOT / "pyproject.toml").read_text()
    for init in sorted((ROOT / "forecast_peft").rglob("__init__.py")):
        package = ".".join(init.parent.relative_to(ROOT).parts)
        assert f'"{package}",' in text, f"{package} is not in [tool.setuptools] packages"
        for suffix in sorted(
            {p.suffix for p in init.parent.iterdir() if p.is_file() and p.suffix not in (".py", ".pyc")}
        ):
            assert re.search(rf'"{re.escape(package)}" = \[[^]]*"\*{re.escape(suffix)}"', text), f"{package}: *{suffix}"
