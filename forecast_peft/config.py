"""Hydra composition of a stage's configuration from the package's conf/ directory."""

from __future__ import annotations

import difflib
import inspect
import json
import os
import re
import shlex
import sys
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from forecast_peft.config_checks import check_config, trainer_check_needed
from forecast_peft.errors import ConfigError, UserError, list_text
from forecast_peft.runtime import say

CONFIG_MODULE = "forecast_peft.conf"
RUN_DIR_ENV = "FPEFT_RUN_DIR"  # the run directory of the first process of a multi-GPU launch
SWEEP_DIR_ENV = "FPEFT_SWEEP_DIR"  # and the folder of its --multirun sweep
FINISHED_FILE = "finished.json"  # in a run directory whose fit ended (training.finish_run)
RUN_LOCK = ".lock"  # in a run directory, locked by the process that trains it (claim_run_dir)
TPP_DIR = "tpp"  # a tuning run's target-parameter pre-training (logs, checkpoints), inside its run directory
STAGES = ("synth", "convert", "preprocess", "pretrain", "tune", "eval", "predict", "deploy", "viz", "runs", "demo")


def _trainer_arguments() -> set[str]:
    import pytorch_lightning as pl

    return {name for name in inspect.signature(pl.Trainer.__init__).parameters if name != "self"}


def _expand_trainer_overrides(overrides: list[str], cfg_trainer_keys: set[str]) -> list[str]:
    """Let every Lightning ``Trainer`` argument be set as ``trainer.<name>=...``.

    Keys already in conf/trainer are plain overrides; any other Trainer argument is added with
    Hydra's ``+`` prefix; a name the Trainer does not know is an error.
    """
    out = []
    known: set[str] | None = None
    for item in overrides:
        key = item.split("=", 1)[0]
        if key.startswith("trainer.") and "=" in item:
            name = key[len("trainer.") :]
            if name not in cfg_trainer_keys:
                known = known if known is not None else _trainer_arguments()
                if name not in known:
                    raise ConfigError(f"unknown trainer argument '{name}' in override '{item}'")
                item = "+" + item
        out.append(item)
    return out


def compose(stage: str, overrides: list[str] | None = None, run: str = "", print_only: bool = False) -> DictConfig:
    """Compose ``conf/<stage>.yaml`` with Hydra ``overrides`` and resolve it once.

    Resolving here freezes values such as the run directory's time stamp. ``run`` names the run
    in the warnings it prints (a sweep's: ``sweep run mode=ft: ``). ``print_only``: for
    ``--print-config``, which checks the Trainer's values against this machine only where they
    may fail (``config_checks.trainer_check_needed``).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if stage not in STAGES:
        raise ConfigError(f"unknown stage '{stage}' (stages: {', '.join(STAGES)})")
    overrides = list(overrides or [])
    for item in overrides:
        if "=" not in item and not item.startswith("~"):
            raise ConfigError(f"malformed override '{item}': expected key=value{_path_hint(stage, item)}")
    if stage == "demo":
        _check_demo_overrides(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base=None):
            # the stage's defaults with the same config groups (model=tiny, ...), to check against
            base = hydra_compose(config_name=stage, overrides=_group_choices(overrides))
            if "device" in base:
                _check_inference_overrides(stage, base, overrides)
            elif stage in STAGE_SETTINGS:
                _check_unread_overrides(stage, base, overrides)
            trainer_keys = set(base.trainer.keys()) if "trainer" in base else set()
            cfg = hydra_compose(config_name=stage, overrides=_expand_trainer_overrides(overrides, trainer_keys))
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"bad configuration for '{stage}': {_explain(stage, err, overrides)}") from None
    finally:
        GlobalHydra.instance().clear()
    if cfg.get("auto_resume") and not cfg.get("resume"):
        _auto_resume(cfg)
    if cfg.get("resume"):
        cfg = _resumed(stage, cfg, overrides)
    elif stage == "tune" and cfg.get("pretrained"):
        _pretrained_model(cfg, overrides)
    check_config(cfg, base, trainer=not print_only or trainer_check_needed(map(_override_key, overrides)))
    if not cfg.get("resume"):  # a resumed run refuses model settings of its own
        for line in unused_model_settings(cfg, overrides):
            say(f"warning: {run}{line}", file=sys.stderr)
    return cfg


def unused_model_settings(cfg: DictConfig, overrides: list[str]) -> list[str]:
    """The ``model.*`` overrides of a tuning run that its network never reads, one line each:
    adapters with ``--mode ft``, prompts and adapters with ``--mode baseline``, the masking of
    ``model.mae.*`` without target-parameter pre-training. (``fpeft pretrain model.peft.*`` is
    read: tuning on its checkpoint takes those sizes by default.) Warnings rather than errors: a
    sweep over the modes (``mode=peft,ft model.peft.adapter_rank=16``) gives the same settings to
    every run."""
    if cfg.get("stage") != "tune":
        return []
    mode = cfg.get("mode")
    if mode == "baseline":
        unused = {"model.peft": "--mode baseline has no prompts or adapters (Forecast-MAE fine-tuning)"}
    elif mode == "ft":
        unused = {"model.peft.adapter_rank": "--mode ft has no adapters (its prompts are model.peft.num_prompts)"}
    else:
        unused = {}
    if not cfg.get("tpp_epochs"):
        unused["model.mae"] = "tuning masks nothing: model.mae.* is for target-parameter pre-training (tpp_epochs > 0)"
    lines = []
    for item in overrides:
        if item.startswith("~"):  # a deletion sets nothing
            continue
        key = _override_key(item)
        for prefix, why in unused.items():
            if key == prefix or key.startswith(prefix + "."):
                lines.append(f"'{item}' is not used: {why}")
    return lines


# what `fpeft demo` reads of its configuration besides demo.*: each stage it runs is composed
# from the demo's settings and the stage's own defaults
DEMO_KEYS = ("run_dir", "runs_root")


# where a checkpoint or folder goes, for a stage given one bare where its overrides go
PATH_OPTIONS = {
    "preprocess": "data.root=DIR",
    "pretrain": "--resume RUN (a run to continue) or data.root=DIR",
    "tune": "--pretrained CKPT, --resume RUN (a run to continue) or data.root=DIR",
    "eval": "-c CKPT (repeatable) or data.root=DIR",
    "predict": "-c CKPT or data.root=DIR",
    "deploy": "-c CKPT",
    "viz": "-c CKPT (repeatable) or data.root=DIR",
    "demo": "demo.root=DIR (the data) or run_dir=DIR (the runs and report)",
}


def _path_hint(stage: str, item: str) -> str:
    """For a bare ``item`` that looks like a path (a folder in it, a checkpoint's suffix, or one
    that exists): the option or setting that takes it, as `; give a path as -c CKPT ...`."""
    path = Path(item)
    if stage not in PATH_OPTIONS or not (
        "/" in item or path.suffix in (".ckpt", ".pt", ".safetensors") or path.exists()
    ):
        return ""
    return f"; give a path as {PATH_OPTIONS[stage]} (see fpeft {stage} --help)"


def _check_demo_overrides(overrides: list[str]) -> None:
    """`fpeft demo data.slot_multiple=1` ran with the demo's own data settings, the override
    ignored in silence: a one-line error for any override the demo would not read."""
    for item in overrides:
        key = _override_key(item)
        if not key.startswith("demo.") and key not in DEMO_KEYS:
            raise ConfigError(
                f"fpeft demo sets each stage's settings itself and would ignore '{item}': it takes demo.* "
                "settings (demo.model, demo.tune_epochs, ...; see --print-config), run_dir and runs_root; "
                "run the stages themselves for others"
            )


# the settings of the stages that neither train nor run a network; other values of their
# configuration (the data group's loader settings, Lightning's Trainer) they never read
STAGE_SETTINGS = {
    "synth": ("synth",),
    "convert": ("convert",),
    "preprocess": ("data.root", "data.cache_dir", "data.preprocess_workers", "data.shard_size", "splits"),
    "runs": ("root", "sort", "plot", "runs_root"),
}


def _check_unread_overrides(stage: str, base: DictConfig, overrides: list[str]) -> None:
    """`fpeft preprocess data.num_workers=16` ran with 2 worker processes (its own are
    data.preprocess_workers), and `fpeft synth ... trainer.max_epochs=3` wrote its scenarios, the
    value taken in silence: a Trainer setting, or a data setting the stage never reads, given to
    synth, preprocess or runs fails in one line that names the stage's own settings."""
    own = STAGE_SETTINGS[stage]

    def unread(key: str) -> str | None:
        if key.startswith("data.") and key not in own:
            return "a setting of the stages that read the cache"
        return None

    names = [f"{k}.{sub}=" for k in own if k in base and OmegaConf.is_dict(base[k]) for sub in base[k]]
    names += [f"{k}=" for k in own if not (k in base and OmegaConf.is_dict(base[k]))]
    _refuse_ignored(stage, overrides, unread, names)


def _refuse_ignored(stage: str, overrides: list[str], unread, own: list[str]) -> None:
    """The first override that ``stage``, which trains nothing, would ignore (a ``trainer.*`` value,
    or one ``unread(key)`` names: what it is) fails in one line with the stage's ``own`` settings."""
    for item in overrides:
        key = _override_key(item)
        what = "a Lightning Trainer setting" if key.startswith("trainer.") else unread(key)
        if what:
            raise ConfigError(
                f"fpeft {stage} trains nothing and would ignore '{item}', {what}: its own settings are "
                + ", ".join(own)
                + " (see --print-config)"
            )


# the data settings only training reads: the stages that run a network without training refuse them
TRAINING_DATA = {
    "data.batch_size": "the training batch size",
    "data.shuffle": "the training order",
    "data.train_order": "the training order",
    "data.train_fraction": "the training subset",
    "data.subset_seed": "the training subset",
}


def _check_inference_overrides(stage: str, base: DictConfig, overrides: list[str]) -> None:
    """`fpeft eval trainer.precision=bf16-mixed` scored in float32, and `data.batch_size=256` left
    its batches at 64: the stages that run a network without training (eval, predict, viz) read
    neither (nor the training order or subset, ``data.train_fraction`` and the like: they score the
    whole split, in size order), and took them in silence. A one-line error names their own
    settings."""
    own = [
        f"{key}="
        for key in ("device", "precision", "compile", "data.eval_batch_size")
        if OmegaConf.select(base, key) is not None
    ]
    _refuse_ignored(stage, overrides, TRAINING_DATA.get, own)


def expand_home(overrides: list[str]) -> list[str]:
    """``data.root=~/av2``: the shell leaves a ``~`` after ``=`` as it is, and Hydra's grammar
    cannot read one there (``~key`` deletes a key); a value that starts with ``~/``, as each value
    of a sweep, a list or ``choice(...)`` may, is a path in the home directory."""
    home = os.path.expanduser("~")
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and not key.startswith("~"):
            item = key + sep + re.sub(r"(^|[,(\[])~(?=[/,)\]]|$)", lambda m: m.group(1) + home, value)
        out.append(item)
    return out


def _explain(stage: str, err: Exception, overrides: list[str]) -> str:
    """Hydra's composition error in one line, in the user's terms: a mistyped key with the
    nearest known one (Hydra's own advice, a ``+key=`` that adds it, is rarely what was meant),
    an unknown config-group choice with the choices there are."""
    message = str(err).strip()
    key = re.match(r"Could not override '([^']+)'", message)
    if key:
        if key.group(1) in RENAMED:
            return f"'{key.group(1)}' is gone: {RENAMED[key.group(1)]}"
        near = _nearest_key(key.group(1), _stage_keys(stage))
        return f"unknown key '{key.group(1)}'" + (f" (did you mean '{near}'?)" if near else "")
    choice = re.search(r"Could not find '([^'/]+)/([^']+)'", message)
    if choice and choice.group(1) in config_groups():
        group, name = choice.groups()
        return f"unknown {group} '{name}' (choose one of {', '.join(group_options(group))})"
    advice = quoting_advice(overrides)
    if advice:
        return advice
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else type(err).__name__


# keys of earlier versions and what replaced them: an old command is told the new names, not the
# nearest spelling (demo.lr is closest to demo.root)
RENAMED = {
    "demo.lr": "set demo.pretrain_lr (pre-training) and demo.tune_lr.peft, .ft, .baseline (tuning)",
}

# the device setting of the stages that run a network without training and of those that train
OTHER_STAGE_NAMES = {"device": "trainer.accelerator", "accelerator": "device"}


def _nearest_key(key: str, known: list[str]) -> str | None:
    """The known key a mistyped ``key`` most likely meant: the closest spelling (``data.rooot``:
    ``data.root``), else the one key with the same last name (``lr``: ``optim.lr``), else, for
    ``device`` or ``accelerator``, the stage's own (``trainer.accelerator`` or ``device``)."""
    near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if near:
        return near[0]
    last = key.rsplit(".", 1)[-1]
    same = [k for k in known if k.rsplit(".", 1)[-1] == last]
    if len(same) == 1:
        return same[0]
    other = OTHER_STAGE_NAMES.get(key)
    return other if other in known else None


def quoting_advice(overrides: list[str], sweep: bool = False) -> str | None:
    """The first override that Hydra's grammar cannot read because a character of a plain value
    is syntax to it ('=' of a sweep's run directory runs/seed=1, '(' of a folder 'a (copy)', '#',
    a quote, a non-ASCII letter), with its value quoted as the shell must pass it on (the shell
    strips plain quotes: pretrained='runs/seed=1' reaches Hydra unquoted); each value of a sweep's
    comma-separated list quoted alone. None where there is no such override: a list, a dict or a
    sweep function (range(...)) that is malformed is another error."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key.startswith("~") or value[:1] in "[{'\"" or re.match(r"\w+\(", value):
            continue
        try:
            parser.parse_override(item)
            continue
        except Exception:  # Hydra's parse errors are of several classes, none of them a bug here
            pass
        syntax = "=()[]{}#'\"~" + ("" if sweep else ",")  # a sweep's commas part its values
        found = [c for c in dict.fromkeys(value) if c in syntax or not c.isascii()]
        shell = _quoted_override(key, value.split(",") if sweep else [value])
        chars = " and ".join(map(repr, found)) or "a character"
        return f"{item}: Hydra's override grammar reads {chars} in a value as syntax; quote the value: {shell}"
    return None


def _quoted_override(key: str, values: list[str]) -> str:
    """``key=value`` with each value quoted for Hydra (read as a plain string), and the whole
    quoted for the shell, which strips a plain pair of quotes: ``"data.root='/data/é'"``."""
    quoted = ",".join(f'"{v}"' if "'" in v else f"'{v}'" for v in values)
    return shlex.quote(f"{key}={quoted}") if re.search(r'["$`\\]', quoted) else f'"{key}={quoted}"'


def command_line(*words: str | Path, overrides: dict[str, object] | None = None) -> str:
    """``fpeft`` and ``words`` as a line to paste into a shell: a word with a space or a quote in it
    (a path) quoted for the shell, and an override whose value Hydra would not read back as the
    same string (a non-ASCII letter, '=', parentheses, a number) quoted for Hydra as well."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    parts = ["fpeft", *(shlex.quote(str(word)) for word in words)]
    for key, value in (overrides or {}).items():
        many = isinstance(value, (list, tuple))
        meant = [str(v) for v in value] if many else str(value)
        item = f"{key}={list_text(meant) if many else meant}"
        try:
            plain = parser.parse_override(item).value() == meant
        except Exception:  # Hydra's parse errors are of several classes, none of them a bug here
            plain = False
        if plain:
            parts.append(shlex.quote(item))
        elif many:  # each value quoted for Hydra, the whole for the shell
            parts.append(shlex.quote(f"{key}=[{','.join(repr(v) for v in meant)}]"))
        else:
            parts.append(_quoted_override(key, [meant]))
    return " ".join(parts)


def own_cache(root, cache_dir) -> bool:
    """Whether ``cache_dir`` is the data root's own cache, ``<root>/cache`` (conf/data/av2.yaml's
    ``${data.root}/cache``, resolved): one that follows the root where another root is given."""
    return str(cache_dir) == f"{root}/cache"


def data_overrides(data) -> dict[str, object]:
    """The overrides that point another stage at the same data as ``data`` (a resolved
    ``cfg.data``): its root, its cache where that is not the root's own (``data.cache_dir``
    given: a read-only root, a faster disk), which a command without it would build again there,
    and its cities where it chose some (``data.cities``)."""
    where: dict[str, object] = {"data.root": str(data.root)}
    if not own_cache(data.root, data.cache_dir):
        where["data.cache_dir"] = str(data.cache_dir)
    cities = list(data.get("cities") or [])
    if cities:  # the run's scenes: its validation scored these cities alone
        where["data.cities"] = tuple(cities)
    return where


def _stage_keys(stage: str) -> list[str]:
    """Every key of the stage's default configuration, composed without the checks ``compose``
    runs on it (the Trainer check imports Lightning: a mistyped key took 5 s to name, now under 1)."""
    return _keys(_compose_plain(stage))


def _keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Every key of ``cfg`` as a dotted path (``data.root``, ``model.agent.widths``)."""
    out = []
    for name, value in cfg.items():
        path = f"{prefix}{name}"
        out.append(path)
        if isinstance(value, DictConfig):
            out += _keys(value, path + ".")
    return out


def resume_target(resume: str | Path) -> tuple[Path, Path]:
    """``--resume``'s run directory and checkpoint: a run directory (its checkpoints/last.ckpt,
    or, for a tuning run stopped in its target-parameter pre-training, RUN/tpp/checkpoints/last.ckpt)
    or a checkpoint inside one (RUN/checkpoints/x.ckpt, RUN/tpp/checkpoints/x.ckpt)."""
    target = Path(resume)
    if target.is_dir():
        last = target / "checkpoints" / "last.ckpt"
        tpp = target / TPP_DIR / "checkpoints" / "last.ckpt"
        return target, tpp if tpp.exists() and not last.exists() else last
    run = target.parent.parent
    if run.name == TPP_DIR and not (run / "config.yaml").is_file() and (run.parent / "config.yaml").is_file():
        run = run.parent
    return run, target


def in_tpp(run_dir: str | Path, checkpoint: str | Path) -> bool:
    """Whether a run's checkpoint to resume is of its target-parameter pre-training."""
    return Path(checkpoint).parent.parent == Path(run_dir) / TPP_DIR


def _override_key(item: str) -> str:
    """An override's key: ``trainer.max_epochs`` of ``+trainer.max_epochs=3``, ``a.b`` of ``~a.b``."""
    return item.partition("=")[0].lstrip("+~")


def _override_keys(overrides: list[str]) -> list[str]:
    """The keys the command sets (``trainer.max_epochs`` of ``+trainer.max_epochs=3``); Hydra's
    deletions (``~key``) left out."""
    return [_override_key(item) for item in overrides if not item.startswith("~")]


def read_run_config(path: Path) -> DictConfig:
    """A run's saved ``config.yaml``; a truncated or hand-edited one fails in one line."""
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # yaml's errors are of many classes
        raise ConfigError(f"{path}: not readable YAML ({type(err).__name__})") from None
    if not isinstance(cfg, DictConfig) or cfg.get("stage") not in STAGES:
        raise ConfigError(f"{path}: not a run's configuration (no stage in it)")
    return cfg


def _auto_resume(cfg: DictConfig) -> None:
    """``--auto-resume``: go on with the run in ``run_dir=`` where it holds one (as ``--resume``
    would), and start it there where it does not, so that one command serves a batch job's first
    start and every restart (a SLURM requeue, a preempted job, a resubmitted script)."""
    run_dir = Path(cfg.run_dir)
    if time_stamped(cfg, run_dir):
        raise ConfigError(
            "--auto-resume needs run_dir=DIR, the same at every start of the job: it goes on with the run there "
            "if there is one and starts it there if not"
        )
    if resume_target(run_dir)[1].exists():
        cfg.resume = str(run_dir)


def continues_when_restarted(cfg: DictConfig) -> bool:
    """Whether this command, started again as it is (a requeued job), goes on with this run rather
    than starting another: ``--resume``, ``--auto-resume``, or a sweep in a named folder."""
    return bool(cfg.get("resume") or cfg.get("auto_resume"))


def _resumed(stage: str, cli: DictConfig, overrides: list[str]) -> DictConfig:
    """``--resume RUN``: the run's own configuration (its config.yaml), with this command's
    overrides on top (``trainer.max_epochs=100`` lets a run go on), so that a resumed run keeps
    the data, model and recipe it started with rather than this command's defaults."""
    if not Path(cli.resume).exists():  # a mistyped path: said before the data root is checked, or cached
        raise UserError(f"nothing to resume: {cli.resume} does not exist (`fpeft runs` lists the runs)")
    run_dir, _ = resume_target(cli.resume)
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():  # a checkpoint outside a run directory: the command line's configuration
        cli.run_dir = str(run_dir)
        return cli
    saved = read_run_config(saved_path)
    if saved.get("stage") != stage:
        raise ConfigError(
            f"{run_dir} is a run of `fpeft {saved.get('stage')}`: resume it with "
            f"`{command_line(saved.get('stage'), '--resume', run_dir)}`"
        )
    taken = _override_keys(overrides)
    # the saved config is resolved: a cache that followed the data root there (conf/data/av2.yaml:
    # ${data.root}/cache) follows a data root given now as well
    data = saved.get("data") or {}
    if "data.root" in taken and "data.cache_dir" not in taken and own_cache(data.get("root"), data.get("cache_dir")):
        taken.append("data.cache_dir")
    cities = list(OmegaConf.select(saved, "data.cities", default=None) or [])
    for key in taken:
        OmegaConf.update(saved, key, OmegaConf.select(cli, key), merge=False)
    now = list(OmegaConf.select(saved, "data.cities", default=None) or [])
    if now != cities:
        say(
            f"note: data.cities {list_text(cities)} -> {list_text(now)}: the run trains and validates on other "
            "scenes from here on, and its best checkpoint so far was chosen on the scenes before",
            file=sys.stderr,
        )
    for item in overrides:
        if item.startswith("~"):  # Hydra's deletion
            parent, _, leaf = item[1:].split("=", 1)[0].rpartition(".")
            node = OmegaConf.select(saved, parent) if parent else saved
            if isinstance(node, DictConfig):
                node.pop(leaf, None)
    saved.run_dir, saved.resume = str(run_dir), cli.resume  # --resume's, or --auto-resume's
    return saved


def _pretrained_model(cfg: DictConfig, overrides: list[str]) -> None:
    """Tuning on a pre-trained checkpoint takes that checkpoint's model configuration (a backbone
    pre-trained with ``model=tiny`` is tuned as tiny without saying so again), with this command's
    ``model.*`` overrides on top (the PEFT sizes are free at tuning time). A command that picks
    the model itself (``model=...``, or a backbone size) keeps it: a mismatch is then the tune
    stage's one-line error naming the sizes."""
    from forecast_peft.checkpoints import load_checkpoint, model_config, stage_of
    from forecast_peft.models.config import BACKBONE_FIELDS

    keys = _override_keys(overrides)
    if any(k == "model" or (k.startswith("model.") and k.split(".")[1] in BACKBONE_FIELDS) for k in keys):
        return
    ckpt = load_checkpoint(cfg.pretrained)
    if stage_of(ckpt) != "pretrain":  # refused by the tune stage, in its own words
        return
    given = {k: OmegaConf.select(cfg, k) for k in keys if k.startswith("model.")}
    cfg.model = OmegaConf.create(model_config(ckpt).to_dict())
    for key, value in given.items():
        OmegaConf.update(cfg, key, value, merge=False)


def config_groups() -> list[str]:
    """The config groups: the folders of conf/ (data, model, ...)."""
    from importlib.resources import files

    return sorted(p.name for p in files(CONFIG_MODULE).iterdir() if p.is_dir() and not p.name.startswith("_"))


def group_options(group: str) -> list[str]:
    """The choices of a config group: its conf/<group>/<name>.yaml files (``model``: forecast_mae, small, tiny)."""
    from importlib.resources import files

    return sorted(
        f.name.removesuffix(".yaml") for f in (files(CONFIG_MODULE) / group).iterdir() if f.name.endswith(".yaml")
    )


def group_option(group: str, name: str) -> DictConfig:
    """One config group file as composed (its own defaults applied): ``group_option("model", "tiny")``.
    Quicker than a stage's whole configuration, whose checks import Lightning."""
    return _compose_plain(f"{group}/{name}")[group]


def _compose_plain(config_name: str, overrides: list[str] | None = None) -> DictConfig:
    """``conf/<config_name>.yaml`` as Hydra composes it with ``overrides`` (none: its defaults),
    and none of ``compose``'s checks."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base=None):
            return hydra_compose(config_name=config_name, overrides=list(overrides or []))
    finally:
        GlobalHydra.instance().clear()


def _group_choices(overrides: list[str]) -> list[str]:
    """The ``model=tiny``-style overrides: a config group and one of its files."""
    groups = config_groups()
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in groups]


def _now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


if not OmegaConf.has_resolver("now"):
    OmegaConf.register_new_resolver("now", _now)


def make_run_dir(cfg: DictConfig) -> Path:
    """Create the run directory and save the composed config in it. The other processes of a
    multi-GPU launch (``launch_rank`` > 0) create nothing: Lightning writes checkpoints and logs
    from the first process only, into its run directory. Lightning's own launcher starts them
    with the first process's environment, where ``RUN_DIR_ENV`` names that directory (their own
    time stamp would name another)."""
    from forecast_peft.runtime import launch_rank

    if launch_rank() > 0:
        return Path(os.environ.get(RUN_DIR_ENV, cfg.run_dir))
    run_dir = Path(cfg.run_dir)
    if time_stamped(cfg, run_dir):
        run_dir = _new_directory(run_dir)
    else:
        check_run_dir(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
    claim_run_dir(run_dir)
    cfg.run_dir = str(run_dir)
    OmegaConf.save(cfg, run_dir / "config.yaml")
    os.environ[RUN_DIR_ENV] = str(run_dir)
    return run_dir


def finished_record(run_dir: str | Path) -> dict:
    """A run's ``finished.json`` (training.finish_run): {} where there is none or it cannot be read."""
    try:
        record = json.loads((Path(run_dir) / FINISHED_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


_claimed: dict[Path, object] = {}  # run directory -> its lock file, open and locked by this process


def claim_run_dir(run_dir: Path) -> None:
    """Lock ``run_dir`` for this process until ``release_run_dir`` (or its exit): a second
    process started on the same run directory (the command run twice, a job started twice) is
    refused in one line, where it would mix its logs and checkpoints into the first one's. Only
    the first process of a multi-GPU launch claims it. Where the file system has no locks, go on
    without."""
    import fcntl

    key = Path(run_dir).resolve()
    if key in _claimed:
        return
    lock = open(key / RUN_LOCK, "a+")  # held open while the run lasts
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        pid = lock.read().strip()
        lock.close()
        by = f" (pid {pid})" if pid else ""
        raise ConfigError(
            f"run_dir {run_dir} is in use by another fpeft process{by}: wait for it to end, or give another run_dir="
        ) from None
    except OSError:  # e.g. a network file system mounted without locks
        pass
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    _claimed[key] = lock


def run_holder(run_dir: Path) -> str | None:
    """Whether another process trains in ``run_dir`` now: its pid if one holds the run's lock,
    "" if none does, None where it cannot be told (a run without a lock file, a file system
    without locks). This process's own claims are of runs that have ended: it asks from outside
    a stage (a sweep's table, after a run failed)."""
    import fcntl

    path = Path(run_dir) / RUN_LOCK
    if not path.is_file():
        return None
    if path.parent.resolve() in _claimed:
        return ""
    with open(path) as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return lock.read().strip() or "?"
        except OSError:
            return None
    return ""


def release_run_dir(run_dir: Path) -> None:
    """End ``claim_run_dir``'s hold once the run has ended (a sweep goes on to its next run)."""
    lock = _claimed.pop(Path(run_dir).resolve(), None)
    if lock is not None:
        lock.close()


def sweep_folder(cfg: DictConfig) -> Path:
    """The folder of a ``--multirun`` sweep's runs: ``run_dir=`` as given (a sweep run again
    there keeps the runs it finds), or a new time-stamped one, as a single run gets. The other
    processes of a multi-GPU launch take the first one's and create nothing (``make_run_dir``)."""
    from forecast_peft.runtime import launch_rank

    folder = Path(cfg.run_dir)
    if SWEEP_DIR_ENV in os.environ and launch_rank() > 0:  # from Lightning's own launcher
        return Path(os.environ[SWEEP_DIR_ENV])
    if time_stamped(cfg, folder):
        processes = max(int(os.environ.get(key, 1)) for key in ("WORLD_SIZE", "SLURM_NTASKS"))
        if processes > 1:  # torchrun, srun: every process would stamp a folder of its own
            raise ConfigError(f"a sweep across {processes} processes needs run_dir=FOLDER, the same in every one")
        folder = _new_directory(folder)
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[SWEEP_DIR_ENV] = str(folder)
    return folder


def check_run_dir(cfg: DictConfig) -> None:
    """Refuse a ``run_dir=`` that holds a run to resume (its ``last.ckpt``): a second run would
    overwrite its logs and checkpoints. A run stopped before its first epoch ended left nothing
    to resume and may be run again in place. Stages call it before any work, ``make_run_dir``
    again when it creates the directory. The other processes of a multi-GPU launch run the same
    command once the first one has made the directory: they are not refused."""
    from forecast_peft.runtime import launch_rank

    run_dir = Path(cfg.run_dir)
    if not cfg.get("resume") and launch_rank() == 0 and resume_target(run_dir)[1].exists():
        raise ConfigError(
            f"run_dir {run_dir} already holds a run: `{command_line(cfg.stage, '--resume', run_dir)}` continues it; "
            "give another run_dir= to start a new one"
        )


def time_stamped(cfg: DictConfig, run_dir: Path) -> bool:
    """Whether ``run_dir`` is the default name, ``<runs_root>/<stage>/<time>`` (conf/_base.yaml)."""
    return run_dir.parent == Path(cfg.runs_root) / cfg.stage and bool(
        re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", run_dir.name)
    )


def _new_directory(run_dir: Path) -> Path:
    """``run_dir``, or ``run_dir-2``, ``-3``, ... if runs started in the same second (a sweep
    launching several at once) took it: created atomically, so no two runs share one."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        candidate = run_dir if n == 1 else run_dir.with_name(f"{run_dir.name}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise ConfigError(f"{run_dir.parent}: no free run directory name for {run_dir.name}")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)
