"""`fpeft pretrain|tune --multirun`: every combination of the swept overrides' values, one run
after the other, each in its own directory of one sweep folder.

Overrides sweep with Hydra's own grammar: ``seed=1,2,3``, ``tpp_epochs=range(0,5,2)``,
``model.peft.adapter_rank=choice(16,64)``. Every run's configuration is composed before the first
one starts, so a bad value stops the sweep in one line before hours of training. A run that fails
with a user error (a bad checkpoint, a split missing) is reported and the others go on. The same
command run again (same ``run_dir=``) keeps the finished runs it finds, resumes the interrupted ones
and starts the rest, so more values run only the new ones; with a larger ``trainer.max_epochs``
the finished runs train on, and a finished run made with other values is kept with a line that
says which.
"""

from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path

from omegaconf import DictConfig

from forecast_peft import config
from forecast_peft.errors import ConfigError, StorageError, Terminated, UserError, count
from forecast_peft.runtime import launch_rank, say


def expand(overrides: list[str]) -> tuple[list[str], list[list[str]]]:
    """The overrides every run shares, and each run's swept ``key=value`` overrides (their
    cartesian product, in the order given)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        advice = config.quoting_advice(overrides, sweep=True)
        raise ConfigError(
            f"bad override {advice}" if advice else f"bad override: {' '.join(str(err).split())}"
        ) from None
    fixed, axes = [], []
    for override in parsed:
        key = override.get_key_element()
        if key.lstrip("+~") == "resume":
            raise ConfigError("--multirun resumes the interrupted runs of its folder: run the same sweep again")
        if key.lstrip("+~") == "auto_resume":
            raise ConfigError(
                "--multirun in run_dir=FOLDER goes on with the runs there by itself when run again (finished ones "
                "kept, interrupted ones resumed): leave out --auto-resume"
            )
        if not override.is_sweep_override():
            fixed.append(override.input_line)
            continue
        if not override.is_discrete_sweep():
            raise ConfigError(f"{override.input_line}: --multirun sweeps lists of values (a,b or range(...))")
        if key == "run_dir":
            raise ConfigError(f"{override.input_line}: run_dir, the sweep's folder, takes one value")
        axes.append([f"{key}={value}" for value in override.sweep_string_iterator()])
    if not axes:
        raise ConfigError("--multirun needs an override with several values, e.g. seed=1,2,3")
    return fixed, [list(combination) for combination in itertools.product(*axes)]


def run_name(swept: list[str]) -> str:
    """A run's directory name: its swept overrides, as a file name (``seed=1,tpp_epochs=4``); a
    list's values joined by ``+`` (``data.cities=[austin,miami]``: ``data.cities=austin+miami``),
    so that its commas do not read as the next override's."""
    items = []
    for item in swept:
        key, _, value = item.replace("'", "").replace('"', "").partition("=")
        if value.startswith("[") and value.endswith("]"):
            value = "+".join(v.strip() for v in value[1:-1].split(","))
        items.append(f"{key}={value}")
    return re.sub(r"[^\w.=,+-]", "_", ",".join(items))


def swept_values(name: str) -> dict[str, str] | None:
    """The swept values a run directory's ``name`` gives (``seed=1,tpp_epochs=4``, as ``run_name``
    writes it), or None for another name."""
    parts = name.split(",")
    return dict(part.split("=", 1) for part in parts) if all("=" in part for part in parts) else None


def multirun(stage: str, overrides: list[str], print_only: bool = False) -> list[dict]:
    """Run ``stage`` once for every combination of the swept values; returns one row per run
    (name; status: done, failed or kept; the error of a failed one)."""
    from forecast_peft import stages

    fixed, runs = expand(overrides)
    names = [run_name(swept) for swept in runs]
    if len(set(names)) < len(names):
        raise ConfigError(f"two runs of the sweep would share a directory name ({names}): sweep other values")
    configs = [_compose(stage, fixed + swept, name, print_only) for name, swept in zip(names, runs)]
    if print_only:
        for name, swept in zip(names, runs):
            print(f"{name}: {' '.join(fixed + swept)}")
        return []
    named = not config.time_stamped(configs[0], Path(configs[0].run_dir))
    folder = config.sweep_folder(configs[0])
    for name, cfg in zip(names, configs):
        cfg.run_dir = str(folder / name)
        cfg.auto_resume = named  # the same command, run again, goes on with the runs of a named folder
    say(f"sweep: {count(len(runs), 'run')} of `fpeft {stage}` in {folder}")
    rows, network = [], None
    for i, (name, cfg) in enumerate(zip(names, configs), 1):
        network = _fresh_compile_cache(cfg, network)
        try:
            rows.append(_run_one(getattr(stages, stage), cfg, name, f"[{i}/{len(runs)}] {name}"))
        # Ctrl-C (Lightning exits), SIGTERM, a full disk (the next runs would meet it too)
        except (KeyboardInterrupt, SystemExit, Terminated, StorageError):
            again = "the same command goes on with it (finished runs kept, interrupted ones resumed)"
            say(f"sweep stopped at run {i} of {len(runs)}: {again}", file=sys.stderr)
            raise
    _summarise(stage, folder, rows, {tuple(config.data_overrides(cfg.data).items()) for cfg in configs})
    return rows


def _fresh_compile_cache(cfg: DictConfig, previous: str | None) -> str | None:
    """With ``compile=true`` (or a ``compile_mode``): a run of another network (model sizes, mode)
    or compile mode than the run before compiles from an empty cache (``fresh_cache_for``); runs
    of one network share its graphs."""
    from forecast_peft.models.choices import compile_mode
    from forecast_peft.models.compile import fresh_cache_for
    from forecast_peft.training import container

    how = compile_mode(cfg, training=True)
    if how is None:
        return previous
    return fresh_cache_for(container(cfg.model), (cfg.get("mode"), how), previous)


def _compose(stage: str, overrides: list[str], name: str, print_only: bool) -> DictConfig:
    """A run's configuration, composed before any run starts: a bad value fails the sweep in one
    line that names the run."""
    try:
        return config.compose(stage, overrides, run=f"sweep run {name}: ", print_only=print_only)
    except UserError as err:
        err.args = (f"sweep run {name}: {err}",)
        raise


def _run_one(run_stage, cfg: DictConfig, name: str, title: str) -> dict:
    row = {"name": name}
    if (Path(cfg.run_dir) / config.FINISHED_FILE).is_file():
        changed = _changes(cfg)
        if not _only_more_epochs(changed):
            differ = "; ".join(f"{key} {a!r} there, {b!r} here" for key, a, b in changed[:3])
            note = f" made with other values ({differ}): delete it to run it again with these" if changed else ""
            say(f"{title}: kept, {cfg.run_dir} holds a finished run{note}")
            return {**row, "status": "kept"}
        cfg.resume = cfg.run_dir  # finished, and this sweep asks for more epochs: it trains on
    elif config.resume_target(cfg.run_dir)[1].exists():  # interrupted: it goes on from its last epoch
        cfg.resume = cfg.run_dir
    say(f"{title}: {cfg.run_dir}")
    try:
        run_stage(cfg)
        return {**row, "status": "done"}
    except UserError as err:
        config.release_run_dir(cfg.run_dir)  # another process may resume it while the sweep goes on
        say(f"{title}: failed: {err}")
        return {**row, "status": "failed", "error": str(err)}


def _changes(cfg: DictConfig) -> list[tuple[str, object, object]]:
    """Where the configuration a run was made with differs from the one the sweep gives it now."""
    from forecast_peft.training import container, differences

    saved = container(config.read_run_config(Path(cfg.run_dir) / "config.yaml"))
    own = ("run_dir", "resume", "auto_resume")  # set by the sweep for each run, not by its values
    return [(key, a, b) for key, a, b in differences(saved, container(cfg)) if key not in own]


def _only_more_epochs(changed: list[tuple[str, object, object]]) -> bool:
    """Whether the one change is a larger ``trainer.max_epochs``: a finished run then trains on."""
    if len(changed) != 1 or changed[0][0] != "trainer.max_epochs":
        return False
    before, now = changed[0][1:]
    return isinstance(before, int) and isinstance(now, int) and 0 <= before < now


def _summarise(stage: str, folder: Path, rows: list[dict], data: set[tuple]) -> None:
    from forecast_peft.runs import PLOT_FILE, find_runs, format_runs, plot_runs

    found, _ = find_runs(folder)
    say(f"\nsweep {folder}:\n{format_runs(found)}" if found else f"\nsweep {folder}: no run finished an epoch")
    if found and launch_rank() == 0:  # the runs' curves side by side (written once, by the first process)
        say(f"learning curves: {plot_runs(found, folder / PLOT_FILE, folder)}")
    failed = [row for row in rows if row["status"] == "failed"]
    for row in failed:
        say(f"failed: {row['name']}: {row['error']}")
    if stage == "tune":
        # the runs' data (root and cache), where they share it
        where = dict(data.pop()) if len(data) == 1 else {"data.root": "DATA"}
        next_step = config.command_line("eval", "-c", folder, overrides=where)
        say(f"next: {next_step}  (every run of the sweep, side by side)")
    if failed:
        raise UserError(f"{count(len(failed), 'run')} of the sweep's {len(rows)} failed (above)")
