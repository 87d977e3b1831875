"""Checks of a composed configuration's values, so that a mistyped override fails at once in one
line (``data.batch_size must be an integer, got 'abc'``) instead of deep inside a run, or
worse, being taken silently (``compile=maybe`` is truthy).

- Every value must have the kind of its default in conf/ (a number where the default is a number,
  true/false where it is a boolean, a list where it is a list); numbers given where a string is
  expected become strings (``precision=32``). Keys whose default is null take anything, but for
  those of ``NULL_DEFAULT_KINDS``, which take null or the kind it names.
- ``trainer.*`` values must fit the annotations of Lightning's ``Trainer`` arguments.
- Some values have a range (``RANGES``); the model's sizes must fit together
  (``ModelConfig.check``).
"""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf

from forecast_peft import slurm
from forecast_peft.errors import ConfigError, list_text

AT_LEAST_ONE = (
    "data.batch_size",
    "data.eval_batch_size",
    "data.slot_multiple",
    "data.shard_size",
    "num",
    "synth.num_scenarios",
    "convert.focal_per_window",
    "convert.workers",
    "demo.pretrain_scenarios",
    "demo.tune_scenarios",
    "demo.val_scenarios",
    "demo.test_scenarios",
    "demo.pretrain_epochs",
    "demo.tune_epochs",
    "demo.pretrain_batch_size",
    "demo.tune_batch_size",
    "demo.val_every",
)
NON_NEGATIVE = (
    "data.num_workers",
    "data.preprocess_workers",
    "optim.weight_decay",
    "optim.warmup_epochs",
    "optim.min_lr",
    "tpp_epochs",
    "early_stop_patience",
    "synth.workers",
    "convert.max_gap_s",
    "demo.workers",
    "demo.tpp_epochs",
    "demo.warmup_epochs",
    # Lightning clips nothing for a negative value, in silence (0 is its way to turn clipping off)
    "trainer.gradient_clip_val",
)
POSITIVE = (
    "optim.lr",
    "convert.stride_s",
    "convert.lane_width_m",
    "demo.pretrain_lr",
    "demo.tune_lr.peft",
    "demo.tune_lr.ft",
    "demo.tune_lr.baseline",
)
FRACTIONS = ("data.train_fraction",)
# settings whose default is null (none given), by what they take instead
NULL_DEFAULT_KINDS = {
    "convert.origin": list[float] | None,
    "convert.time_range_s": list[float] | None,
}
SEEDS = ("seed", "data.subset_seed", "synth.seed")  # numpy's range: -1 failed with a traceback in seed_everything
RANGES = (
    (AT_LEAST_ONE, lambda v: v >= 1, ">= 1"),
    (NON_NEGATIVE, lambda v: v >= 0, ">= 0"),
    (POSITIVE, lambda v: v > 0, "> 0"),
    (FRACTIONS, lambda v: 0 < v <= 1, "in (0, 1]"),
    (SEEDS, lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
)


UNIONS = (typing.Union, types.UnionType)  # Optional[X] and X | None alike


def matches(value, kind) -> bool:
    """Whether a config value fits a type annotation. Classes a command line cannot build
    (strategies, loggers, ...) are not checked."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in UNIONS:
        return any(matches(value, a) for a in args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (list, Iterable):
        return isinstance(value, (list, ListConfig)) and (not args or all(matches(v, args[0]) for v in value))
    if kind is dict or origin is dict:
        return isinstance(value, (dict, DictConfig))
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    return True  # a class or a form a command line cannot give: Lightning checks it


def describe(kind) -> str:
    """A type annotation in words: ``an integer or null``."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in UNIONS:
        literals = [v for a in args if typing.get_origin(a) is typing.Literal for v in typing.get_args(a)]
        words = [describe(a) for a in args if typing.get_origin(a) is not typing.Literal]
        if literals:
            words.insert(0, describe(typing.Literal[tuple(literals)]))
        return " or ".join(dict.fromkeys(w for w in words if w))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, Iterable):
        item = describe(args[0]) if args else ""
        return f"a list ({item} each)" if item else "a list"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if kind in names:
        return names[kind]
    return ""  # a class: not something a command line gives


def _default_kind(default):
    if isinstance(default, bool):
        return bool
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return float
    if isinstance(default, ListConfig):
        return list
    return str


def _check_against_defaults(cfg: DictConfig, defaults: DictConfig, prefix: str = "") -> None:
    for key, default in defaults.items_ex(resolve=False):
        if key not in cfg or (not prefix and key == "trainer"):
            continue
        path = f"{prefix}{key}"
        value = cfg[key]
        if isinstance(default, DictConfig):
            if not isinstance(value, DictConfig):
                raise ConfigError(f"{path} is a group of settings, got {value!r}")
            _check_against_defaults(value, default, path + ".")
            continue
        if default is None:
            continue
        kind = _default_kind(default)
        if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            cfg[key] = str(value)  # precision=32, split names or paths that look like numbers
            continue
        if kind is list and not isinstance(value, ListConfig):
            raise ConfigError(f"{path} must be a list, e.g. {path}=[{value}], got {value!r}")
        if not matches(value, kind):
            raise ConfigError(f"{path} must be {describe(kind)}, got {value!r}")


def _check_null_defaults(cfg: DictConfig) -> None:
    for path, kind in NULL_DEFAULT_KINDS.items():
        value = OmegaConf.select(cfg, path)
        if not matches(value, kind):
            raise ConfigError(f"{path} must be {describe(kind)}, got {value!r}")


def _check_ranges(cfg: DictConfig) -> None:
    for paths, holds, rule in RANGES:
        for path in paths:
            value = OmegaConf.select(cfg, path)
            if value is not None and not holds(value):
                raise ConfigError(f"{path} must be {rule}, got {value!r}")


def _check_choices(cfg: DictConfig) -> None:
    """Settings with a few values, read only when the loaders are made: a mistyped one
    (``data.train_order=sorted``) failed after the cache was brought up to date, which takes hours
    on a new AV2 download, and after the network was built."""
    from forecast_peft.data import check_choices

    if "data" in cfg:
        check_choices(cfg.data)
    if "convert" in cfg:  # before the tracks are read
        from forecast_peft.data.convert import check_focal_by

        check_focal_by(cfg.convert.focal_by)


def _check_schedule(cfg: DictConfig) -> None:
    """The learning rate decays from ``optim.lr`` to ``optim.min_lr`` over ``trainer.max_epochs``:
    a min_lr above lr would make it rise over the run instead, and a run without an end
    (Lightning's max_epochs=-1, or null) has no schedule."""
    if "optim" in cfg and "trainer" in cfg:
        max_epochs = cfg.trainer.get("max_epochs")
        if max_epochs is None or (isinstance(max_epochs, int) and max_epochs < 0):
            raise ConfigError(
                f"trainer.max_epochs must be a number of epochs (>= 0), got {max_epochs!r}: the learning rate "
                "decays over them (trainer.max_time= or trainer.max_steps= may end a run sooner)"
            )
    lr, min_lr = OmegaConf.select(cfg, "optim.lr"), OmegaConf.select(cfg, "optim.min_lr")
    if lr is not None and min_lr is not None and min_lr > lr:
        raise ConfigError(
            f"optim.min_lr ({min_lr:g}) must not exceed optim.lr ({lr:g}): the schedule decays from lr to min_lr"
        )


def _check_early_stop(cfg: DictConfig) -> None:
    """Early stopping watches the validation value, which a run without validation never has."""
    if cfg.get("early_stop_patience") and OmegaConf.select(cfg, "trainer.limit_val_batches") == 0:
        raise ConfigError(
            "early_stop_patience watches the validation value, and trainer.limit_val_batches=0 turns validation "
            "off: drop one of them"
        )


def _check_cities(cfg: DictConfig) -> None:
    """``data.cities`` names cities (strings; whether the split has them is checked where it is
    opened, ``dataset.city_indices``). A leaderboard submission forecasts every scenario of its
    split, so ``fpeft predict`` refuses to leave any out."""
    cities = OmegaConf.select(cfg, "data.cities") or []
    for city in cities:
        if not isinstance(city, str) or not city:
            raise ConfigError(f"data.cities must list city names, e.g. data.cities=[miami,austin], got {city!r}")
    if cities and cfg.get("stage") == "predict":
        raise ConfigError(
            f"data.cities={list_text(cities)} leaves scenarios out, and `fpeft predict` writes a leaderboard "
            "submission, which forecasts every scenario of the split: drop data.cities"
        )


def _check_tensorboard(cfg: DictConfig) -> None:
    """TensorBoard's logs need its package (or tensorboardX), which fpeft does not install."""
    import importlib.util

    if cfg.get("tensorboard") and not any(importlib.util.find_spec(name) for name in ("tensorboard", "tensorboardX")):
        raise ConfigError(
            "tensorboard=true writes TensorBoard's logs, and neither the tensorboard nor the tensorboardX package is "
            "installed: pip install tensorboard (the CSV logs in RUN/logs need neither)"
        )


def _check_precision(cfg: DictConfig) -> None:
    """Pure float16 cannot train with AdamW: its eps (1e-8) is below float16's smallest number and
    the squared gradients underflow with it, so the first step divides by zero and every weight
    becomes NaN (measured: a finite loss, then NaN weights after one step; with eps=1e-4 it trains).
    The run went on and logged val/minFDE6 nan, which ranks as inf."""
    if str(OmegaConf.select(cfg, "trainer.precision")) == "16-true":
        raise ConfigError(
            "trainer.precision=16-true cannot train here: AdamW's eps (1e-8) and its squared gradients underflow "
            "in float16 and the first step turns the weights to NaN; use 16-mixed (float16 arithmetic, float32 "
            "weights), bf16-mixed or 32-true"
        )


# Trainer arguments fpeft sets itself, with what takes their place
FPEFT_TRAINER_ARGS = {
    "logger": "the run's CSV logs, RUN/logs/metrics.csv, and TensorBoard's with tensorboard=true",
    "callbacks": "the run's checkpoints, progress bar and the early stopping that early_stop_patience= sets",
    "default_root_dir": "the run's directory: set it with run_dir=",
    "enable_checkpointing": "the run's last and best checkpoints, which --resume, eval and the sweeps read",
}


def _check_trainer(trainer: DictConfig) -> None:
    import pytorch_lightning as pl
    import torch

    from forecast_peft.models.compile import training_device_type
    from forecast_peft.training import started_by_spawn

    for key, role in FPEFT_TRAINER_ARGS.items():
        if key in trainer:
            raise ConfigError(f"trainer.{key} is set by fpeft ({role}): drop trainer.{key}=")
    hints = typing.get_type_hints(pl.Trainer.__init__)
    for key, value in trainer.items():
        kind = hints.get(key)
        if kind is not None and not matches(value, kind):
            words = describe(kind)
            raise ConfigError(f"trainer.{key} must be {words}, got {value!r}" if words else f"bad trainer.{key}")
    # Lightning's own checks of the values together (an accelerator this machine lacks, a strategy
    # that needs a GPU or a package, num_nodes=0), made before any work: the cache, the run directory
    accelerator = str(trainer.get("accelerator"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ConfigError(
            f"trainer.accelerator={accelerator}, but torch finds no CUDA device on this machine (torch "
            f"{torch.__version__}, {build}): drop it (auto takes a GPU where there is one) or set "
            "trainer.accelerator=cpu"
        )
    kwargs = OmegaConf.to_container(trainer, resolve=True)
    kwargs.update(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    slurm.check_job_step(training_device_type(trainer) == "cuda")  # before Lightning's own check of it, a traceback
    checked = lightning_trainer(quiet=True, **kwargs)
    spawning = str(kwargs.get("strategy")) if started_by_spawn(checked) else None
    _check_processes(checked.num_devices, checked.num_nodes, spawning)


# the variables by which a launcher that starts fpeft's processes itself shows (SLURM's tasks,
# torchrun's elastic agent); a superset of what Lightning takes for one
LAUNCHER_VARIABLES = ("SLURM_NTASKS", "TORCHELASTIC_RUN_ID")


def trainer_check_needed(keys: Iterable[str]) -> bool:
    """Whether ``--print-config`` checks the ``trainer.*`` values with Lightning's ``Trainer``,
    whose import (and torch's) took 4.1 of the 4.6 s of ``fpeft tune --print-config``: where an
    override's key (``keys``, as ``config._override_key`` reads them) sets, adds or drops a trainer
    value, or a launcher (srun, torchrun) started fpeft, whose processes the Trainer must match.
    The defaults alone pass on any machine, and a run checks its values before any work."""
    touched = any(key.split(".", 1)[0] == "trainer" for key in keys)
    return touched or any(name in os.environ for name in LAUNCHER_VARIABLES)


def _check_processes(devices: int, nodes: int, spawning: str | None = None) -> None:
    """Refuse a fit of ``devices`` processes on each of ``nodes`` nodes where a launcher outside
    Lightning (srun in a SLURM job step, torchrun) started another number of processes, each of
    which Lightning then takes for one of the fit's, with the rank the launcher gave it. Before:
    torchrun's two processes with ``trainer.devices=1`` each trained alone (Lightning gave each
    rank 0) into the same run directory, as did ``ddp_spawn``'s processes in a SLURM job step;
    ``--ntasks=1`` with ``trainer.devices=2`` trained one process on one device, without a word;
    other mismatches ended in Lightning's traceback at the fit's start. ``spawning``: the
    strategy, where it starts its processes itself."""
    from forecast_peft.runtime import torchrun_processes

    step = slurm.job_step()  # Lightning looks for SLURM first, then torchrun
    if step is not None:
        launcher, unit, flags = "this SLURM job step", "task", ("--ntasks-per-node", "--nodes")
        how = f"submit the job with --nodes={nodes} --ntasks-per-node={devices} and start fpeft with srun"
    else:
        step = torchrun_processes()
        if step is None:
            _check_own_launch(nodes)
            return
        launcher, unit, flags = "torchrun", "process", ("--nproc-per-node", "--nnodes")
        how = f"start torchrun with --nnodes={nodes} --nproc-per-node={devices}"
    total, per_node, launched_nodes = step
    asked = f"trainer.devices={devices} on trainer.num_nodes={nodes} makes {_many(devices * nodes, 'process')}"
    if spawning and devices * nodes > 1:
        raise ConfigError(
            f"trainer.strategy={spawning} starts its processes itself, which {launcher} cannot use (they would all "
            f"take the rank {launcher} gave this process, and each train alone): use trainer.strategy=ddp, and {how}"
        )
    if per_node is not None and per_node != devices:
        raise ConfigError(
            f"{asked}, but {launcher} has {_many(per_node, unit)} per node ({flags[0]}={per_node}): {how}, or set "
            f"trainer.devices={per_node}"
        )
    if launched_nodes is not None and launched_nodes != nodes:
        raise ConfigError(
            f"{asked}, but {launcher} has {_many(launched_nodes, 'node')} ({flags[1]}={launched_nodes}): set "
            f"trainer.num_nodes={launched_nodes}"
        )
    if total != devices * nodes:
        fits = (
            f"trainer.devices={total // nodes}"
            if total % nodes == 0
            else f"trainer.devices x trainer.num_nodes to {total}"
        )
        raise ConfigError(f"{asked}, but {launcher} has {_many(total, unit)}: {how}, or set {fits}")


def _check_own_launch(nodes: int) -> None:
    """A fit of several nodes that Lightning launches itself (no srun, no torchrun) finds the
    other nodes by the variables set on each: the first node's address and a port, and the node's
    own number. Without them every node took itself for node 0 at 127.0.0.1 (or a port of its own
    choosing) and waited for the others, which never came."""
    if nodes < 2:
        return
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if not (os.environ.get("NODE_RANK") or os.environ.get("GROUP_RANK")):
        missing.append("NODE_RANK")
    if missing:
        # a Kubeflow PyTorchJob sets RANK, the pod's number, and runs one process per pod
        pod = "; in a Kubeflow PyTorchJob, NODE_RANK=$RANK" if os.environ.get("RANK") else ""
        raise ConfigError(
            f"trainer.num_nodes={nodes}, and Lightning starts each node's processes itself: every node needs "
            f"{', '.join(missing)} to find the others (MASTER_ADDR and MASTER_PORT: the first node's address and a "
            f"free port on it; NODE_RANK: the node's number, 0 on the first{pod}), or start fpeft with torchrun or srun"
        )


def _many(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}{'es' if noun.endswith('s') else 's'}"


def lightning_trainer(quiet: bool = False, **kwargs):
    """``pytorch_lightning.Trainer(**kwargs)``, whose refusal of a value is one line (ConfigError);
    ``quiet``: without Lightning's log lines and warnings (a Trainer made only to check values)."""
    import logging
    import warnings

    import pytorch_lightning as pl
    from pytorch_lightning.utilities.exceptions import MisconfigurationException
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    disabled = logging.root.manager.disable
    # a Trainer sets the process's rank for Lightning's rank-zero-only functions (CSV logs are
    # written by rank 0 alone): one made to check values on node 1 of a fit left this process
    # rank 1 for the Trainers after it (Lightning's and lightning_utilities' are one function)
    rank = getattr(rank_zero_only, "rank", None)
    try:
        with warnings.catch_warnings():
            if quiet:
                warnings.simplefilter("ignore")
                logging.disable(logging.WARNING)
            return pl.Trainer(**kwargs)
    except (MisconfigurationException, ValueError, TypeError, ImportError) as err:
        message = " ".join(str(err).split())
        raise ConfigError(f"bad trainer configuration: {message}") from None
    finally:
        logging.disable(disabled)
        if quiet and rank is not None:
            rank_zero_only.rank = rank


def _check_attention_kernel(cfg: DictConfig) -> None:
    """``attention_kernel``: a known kernel, and for a training stage one its device has
    (``trainer.accelerator``; eval and predict check theirs once they have resolved ``device``,
    before any work)."""
    from forecast_peft.models.choices import CUDA_ATTENTION_KERNELS, check_attention_kernel

    kernel, device_type = str(cfg.attention_kernel), None
    if "trainer" in cfg and kernel in CUDA_ATTENTION_KERNELS:  # imports torch, as the Trainer's check does
        from forecast_peft.models.compile import training_device_type

        device_type = training_device_type(cfg.trainer)
    check_attention_kernel(kernel, device_type)


def check_config(cfg: DictConfig, defaults: DictConfig, trainer: bool = True) -> None:
    """Raise ConfigError for the first value of ``cfg`` that does not fit (see the module doc);
    ``defaults`` is the stage's configuration with the same config groups and no other overrides;
    ``trainer``: whether to check the ``trainer.*`` values with Lightning's ``Trainer``."""
    _check_against_defaults(cfg, defaults)
    _check_null_defaults(cfg)
    _check_ranges(cfg)
    _check_choices(cfg)
    _check_schedule(cfg)
    _check_early_stop(cfg)
    _check_precision(cfg)
    _check_tensorboard(cfg)
    _check_cities(cfg)
    if "compile_mode" in cfg:
        from forecast_peft.models.choices import compile_mode

        compile_mode(cfg, training="trainer" in cfg)
    if "attention_kernel" in cfg:
        _check_attention_kernel(cfg)
    if "trainer" in cfg and trainer:
        _check_trainer(cfg.trainer)
    if "model" in cfg:
        from forecast_peft.models.config import ModelConfig

        try:
            model = ModelConfig.from_dict(OmegaConf.to_container(cfg.model))
        except (TypeError, ValueError) as err:  # keys added with +model.<name>=...
            raise ConfigError(f"bad model configuration: {err}") from None
        model.check()
