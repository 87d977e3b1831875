"""``--config FILE``: a stage's settings from a YAML file, under the command line's overrides.

A file holds settings as ``--print-config`` prints them and a run saves them (``RUN/config.yaml``),
nested (``data: {root: /data/av2}``) or dotted (``data.root: /data/av2``), or names a config
group's file (``model: tiny``). Its settings become overrides ahead of the command line's, so they
meet every check a typed override meets, and the command line wins where both set a key (so does
a later file over an earlier one). Of a file, these are left out:

- the settings equal to the stage's defaults, which change nothing (a run's saved configuration
  holds every setting: ``resume: null``, the masking settings of a run without TPP, ...);
- ``stage``, where it is the command's own (another is refused: a run of another stage);
- ``run_dir``, where it is the folder the file is in: a run's own configuration taken as the
  template of a new run, which gets a directory of its own (``run_dir=`` to choose it);
- ``data.cache_dir``, where it is the file's ``<data.root>/cache``: the cache follows the data
  root, also one given on the command line.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from forecast_peft import config
from forecast_peft.errors import ConfigError


def file_overrides(stage: str, paths: list[Path], given: list[str]) -> list[str]:
    """The overrides of the settings files ``paths`` for ``fpeft <stage>`` (in order, a later
    file's value over an earlier one's) that the command line's overrides ``given`` leave."""
    groups = set(config.config_groups())
    taken = {config._override_key(item) for item in given}
    read = [(path, _settings(path, stage)) for path in map(Path, paths)]
    # a key's value, and the file it is from (a later file's over an earlier one's)
    found = {key: (path, value) for path, values in read for key, value in values.items()}
    # a group's file the command line names (model=small) takes the place of the files' values in it
    picked = tuple(f"{key}." for key in taken & groups)
    settings = {key: item for key, item in found.items() if key not in taken and not key.startswith(picked)}
    # the defaults with the group files chosen (model: tiny in a file, model=tiny on the command line)
    choices = [f"{key}={value}" for key, (_, value) in settings.items() if key in groups and isinstance(value, str)]
    choices += [item for item in given if config._override_key(item) in groups]
    defaults = _stage_defaults(stage, choices)
    for path, values in read:
        for key in values:
            _check_key(path, stage, key, defaults, groups)
    return [
        _override(path, key, value)
        for key, (path, value) in settings.items()
        if not (key in defaults and _same(defaults[key], value))
    ]


def _settings(path: Path, stage: str) -> dict[str, object]:
    """The settings ``path`` holds, flat (``data.root``), less those the module doc leaves out."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such settings file" if not path.exists() else f"{path}: not a file")
    try:
        loaded = OmegaConf.load(path)
    except Exception as err:  # yaml's and OmegaConf's errors are of many classes
        words = " ".join(str(err).split())[:160]
        raise ConfigError(f"{path}: not readable YAML ({type(err).__name__}: {words})") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: not a mapping of settings (key: value lines)")
    tree = OmegaConf.to_container(loaded, resolve=False)
    choices = _defaults_list(path, tree.pop("defaults", []))
    flat = {**choices, **flatten(tree)}
    own = flat.pop("stage", stage)
    if own != stage:
        raise ConfigError(
            f"{path}: the settings of `fpeft {own}` (stage: {own}), not of `fpeft {stage}`: give it to `fpeft {own}`"
        )
    run_dir = flat.get("run_dir")
    if isinstance(run_dir, str) and _same_folder(Path(run_dir), path.parent):
        del flat["run_dir"]
    root, cache = flat.get("data.root"), flat.get("data.cache_dir")
    if isinstance(root, str) and "data.cache_dir" in flat and config.own_cache(root, cache):
        del flat["data.cache_dir"]
    return {key: _home(value) for key, value in flat.items()}


def _stage_defaults(stage: str, choices: list[str]) -> dict[str, object]:
    """``fpeft <stage>``'s settings by default, flat, with the group files ``choices`` picks
    (``model=tiny``), and the group files its conf/<stage>.yaml takes (``model: forecast_mae``)."""
    try:
        composed = config._compose_plain(stage, choices)
    except Exception:  # an unknown choice: the composition after this says so in its words
        composed = config._compose_plain(stage)
    return {**flatten(OmegaConf.to_container(composed, resolve=False)), **_stage_choices(stage)}


def _stage_choices(stage: str) -> dict[str, str]:
    """The group files conf/<stage>.yaml's defaults list names (``{"model": "forecast_mae"}``)."""
    from importlib.resources import files

    own = files(config.CONFIG_MODULE) / f"{stage}.yaml"
    entries = OmegaConf.to_container(OmegaConf.create(own.read_text())).get("defaults", [])
    return _defaults_list(Path(str(own)), entries)


def _defaults_list(path: Path, entries) -> dict[str, str]:
    """The group files a Hydra defaults list names (``- model: tiny``), as in a copy of a stage's
    own conf/<stage>.yaml; its other entries (``_self_``, ``_base``) are the stage's own."""
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: defaults must be a list, as in conf/<stage>.yaml (- model: tiny)")
    choices = {}
    for entry in entries:
        if isinstance(entry, dict) and len(entry) == 1:
            ((group, name),) = entry.items()
            choices[str(group)] = name
        elif not isinstance(entry, str):
            raise ConfigError(f"{path}: a defaults entry fpeft cannot read: {entry!r} (expected - GROUP: NAME)")
    return choices


def flatten(tree, prefix: str = "") -> dict[str, object]:
    """A nested mapping as dotted keys; a list, an empty mapping and a scalar are values."""
    if not isinstance(tree, dict) or (not tree and prefix):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _check_key(path: Path, stage: str, key: str, defaults: dict, groups: set[str]) -> None:
    """A key of ``fpeft <stage>``'s settings, a group's name (``model: tiny``) or a Trainer
    argument (``trainer.<name>``); anything else is refused, naming the file."""
    if key in defaults or key in groups or any(k.startswith(key + ".") for k in defaults):
        return
    if key.startswith("trainer.") and key.count(".") == 1:
        arguments = config._trainer_arguments()
        if key[len("trainer.") :] in arguments:
            return
        near = config._nearest_key(key, [f"trainer.{name}" for name in arguments])
        hint = f" (did you mean '{near}'?)" if near else ""
        raise ConfigError(f"{path}: {key} is not an argument of Lightning's Trainer{hint}")
    if key in config.RENAMED:
        raise ConfigError(f"{path}: '{key}' is gone: {config.RENAMED[key]}")
    grouped = [group for group in sorted(groups) if f"{group}.{key}" in defaults]
    if grouped:  # a group's file (conf/data/av2.yaml) without its group's level
        group = grouped[0]
        hint = f" (did you mean '{group}.{key}'? the settings of a file of conf/{group}/ go under `{group}:`)"
    else:
        near = config._nearest_key(key, list(defaults))
        hint = f" (did you mean '{near}'?)" if near else ""
    raise ConfigError(f"{path}: unknown key '{key}' for `fpeft {stage}`{hint}")


def _home(value):
    """A path in the home directory written ``~/...``, as the command line takes it."""
    if isinstance(value, str) and (value == "~" or value.startswith("~/")):
        return os.path.expanduser(value)
    return value


def _same(default, value) -> bool:
    return type(default) is type(value) and default == value


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _override(path: Path, key: str, value) -> str:
    """``key=value`` in Hydra's grammar, read back by its parser as ``value`` itself."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    item = f"{key}={_hydra_value(value)}"
    try:
        back = OverridesParser.create().parse_override(item).value()
    except Exception:  # Hydra's parse errors are of several classes
        back = _UNREAD
    if isinstance(back, (DictConfig, ListConfig)):
        back = OmegaConf.to_container(back)
    if back != value:
        raise ConfigError(f"{path}: {key}: a value the command line's grammar cannot carry ({value!r})")
    return item


_UNREAD = object()


def _hydra_value(value) -> str:
    """``value`` (a YAML scalar, list or mapping) written in Hydra's override grammar: strings
    quoted, so that each stays a string (``32-true``, ``/data/é``, ``'1'``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(_hydra_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{key}:{_hydra_value(item)}" for key, item in value.items()) + "}"
    text = str(value)
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    return "'" + text.replace("'", "\\'") + "'"
