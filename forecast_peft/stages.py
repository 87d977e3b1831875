"""Stages as plain functions of a composed config: the CLI and the tests both call them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from forecast_peft.config import TPP_DIR, check_run_dir, command_line, data_overrides, in_tpp, read_run_config
from forecast_peft.constants import MONITOR
from forecast_peft.errors import (
    ConfigError,
    UserError,
    count,
    first_of,
    gpu_memory_advice,
    list_text,
    require_checkpoint,
)
from forecast_peft.runtime import progress_bar, say


def synth(cfg: DictConfig) -> list[str]:
    """Write synthetic AV2-format scenarios; returns their directories."""
    from forecast_peft.data.synth.generate import generate

    s = cfg.synth
    return generate(s.out, s.split, int(s.num_scenarios), int(s.seed), s.style, int(s.workers))


def convert(cfg: DictConfig) -> dict:
    """Cut driving logs of one's own into AV2 scenarios; returns the counts it printed."""
    from forecast_peft.data.convert import convert as run

    c = cfg.convert
    return run(
        list(c.tracks),
        c.map,
        c.out,
        split=c.split,
        city=c.city,
        stride_s=float(c.stride_s),
        focal_per_window=int(c.focal_per_window),
        focal_types=list(c.focal_types),
        focal_by=c.focal_by,
        time_range_s=None if c.time_range_s is None else list(c.time_range_s),
        max_gap_s=float(c.max_gap_s),
        lane_width_m=float(c.lane_width_m),
        origin=None if c.origin is None else list(c.origin),
        workers=int(c.workers),
    )


def preprocess(cfg: DictConfig):
    """Cache every split of ``data.root``; returns one summary per split."""
    from forecast_peft.data.preprocess import preprocess as run

    d = cfg.data
    return run(d.root, d.cache_dir, list(cfg.splits), int(d.preprocess_workers), int(d.shard_size))


def _start_training(cfg: DictConfig):
    """What pre-training and tuning do before their network is built: refuse a run directory that
    holds a run, say which settings work against the run, seed, bring the cache up to date and open
    the data (a missing or empty split fails before the run directory is made), then make or
    resume the run directory. Returns the datamodule, the run directory and the checkpoint to
    resume from (None for a new run)."""
    import pytorch_lightning as pl

    from forecast_peft.data.preprocess import ensure_cache
    from forecast_peft.training import resolve_resume, warn_of_settings

    check_run_dir(cfg)
    warn_of_settings(cfg)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    ensure_cache(cfg.data, ["train", "val"])
    datamodule = _open_data(cfg)
    run_dir, resume = resolve_resume(cfg)
    return datamodule, run_dir, resume


def _open_data(cfg: DictConfig):
    """The training and validation data, opened before any training starts (so that a missing or
    empty split is reported at once)."""
    from forecast_peft.data.datamodule import ForecastDataModule, start_worker_server

    start_worker_server(cfg.data)
    datamodule = ForecastDataModule(cfg.data, seed=int(cfg.seed))
    train, val = (datamodule.dataset(split) for split in ("train", "val"))
    chosen = train.chosen_by()
    if cfg.data.train_fraction < 1:
        chosen.append(f"data.train_fraction={cfg.data.train_fraction}, data.subset_seed={cfg.data.subset_seed}")
    subset = f" ({', '.join(chosen)})" if chosen else ""
    val_of = f" of {val.total:,}" if len(val) < val.total else ""
    say(
        f"data: {len(train):,} of {count(train.total, 'training scenario')}{subset}, "
        f"{len(val):,}{val_of} for validation"
    )
    return datamodule


def scenes_chosen(dataset) -> str:
    """`` (data.cities=[miami], --scenarios hard.csv: 812 of 3,000 scenarios)`` where the split's
    scenes were chosen by city or by a file (``ForecastDataset.chosen_by``), else nothing: what a
    report scored."""
    chosen = dataset.chosen_by()
    if not chosen:
        return ""
    return f" ({', '.join(chosen)}: {len(dataset):,} of {count(dataset.total, 'scenario')})"


def _scenario_list(cfg: DictConfig):
    """The scenarios ``--scenarios FILE`` lists (``scenario_list.read_scenario_list``), or None."""
    from forecast_peft.data.scenario_list import read_scenario_list

    return read_scenario_list(cfg.scenarios) if cfg.get("scenarios") else None


def attention_kernel(cfg: DictConfig, device_type: str, compiled: bool) -> str:
    """The stage's ``attention_kernel`` (``models.choices.ATTENTION_KERNELS``), checked against the
    device type it runs on: a kernel only CUDA has is a one-line error elsewhere. ``flex`` on a
    network that is not ``compiled`` gets a note: torch then runs it unfused, slowly."""
    from forecast_peft.models.choices import check_attention_kernel

    kernel = check_attention_kernel(str(cfg.get("attention_kernel") or "auto"), device_type)
    if kernel == "flex" and not compiled:
        say(
            "note: attention_kernel=flex is fast only in a compiled network (compile=true); uncompiled, "
            "torch runs flex_attention unfused and slowly",
            file=sys.stderr,
        )
    return kernel


def _network_for_training(model, cfg: DictConfig) -> None:
    """The network a training stage fits, held to its ``attention_kernel``, then torch.compiled
    as ``compile=true`` / ``compile_mode=`` ask (never in a mode that records CUDA graphs:
    ``compile_mode`` refuses those for training)."""
    from forecast_peft.models.choices import compile_mode
    from forecast_peft.models.compile import maybe_compile, mode_on, training_device_type
    from forecast_peft.models.layers import set_attention_kernel

    device_type = training_device_type(cfg.trainer)
    mode = compile_mode(cfg, training=True)
    set_attention_kernel(model, attention_kernel(cfg, device_type, mode is not None))
    if mode is not None:
        mode = mode_on(mode, device_type)
    maybe_compile(model, mode is not None, mode)


def pretrain(cfg: DictConfig) -> dict:
    """Forecast-MAE pre-training; returns the run directory and the best and last checkpoints."""
    from forecast_peft.lit.modules import MAEModule
    from forecast_peft.peft.freeze import trainable_line
    from forecast_peft.training import checkpoint_paths, container, finish_run, fit, make_trainer

    datamodule, run_dir, resume = _start_training(cfg)
    module = MAEModule(model_cfg=container(cfg.model), optim=container(cfg.optim))
    say(trainable_line(module.model))
    _network_for_training(module.model, cfg)
    trainer, ckpt = make_trainer(cfg, run_dir, monitor="val/loss", resume=resume)
    fit(trainer, cfg, module, datamodule=datamodule, ckpt_path=resume)
    result = {"run_dir": str(run_dir), **checkpoint_paths(ckpt, run_dir)}
    downstream = {"data.root": "DOWNSTREAM_DATA"}
    next_step = command_line("tune", "--mode", "peft", "--pretrained", run_dir, overrides=downstream)
    finish_run(result, trainer, cfg, next_step)
    return result


def _target_parameter_pretraining(
    cfg: DictConfig, base: dict, run_dir: Path, model_cfg: dict, datamodule, resume: str | None = None
):
    """Train the prompts and adapters with masked reconstruction on the downstream data, the
    pre-trained backbone frozen (in RUN/tpp, going on from its checkpoint ``resume``); returns
    the trained MAE-with-PEFT network."""
    from forecast_peft.checkpoints import model_state, transfer
    from forecast_peft.lit.modules import MAEModule
    from forecast_peft.peft.freeze import trainable_line
    from forecast_peft.training import container, divergence, fail_diverged, fit, make_trainer

    module = MAEModule(model_cfg=model_cfg, optim=container(cfg.optim), tpp=True)
    optional = {name for name, p in module.model.named_parameters() if p.requires_grad}
    transfer(model_state(base), module.model, (("", ""),), optional=optional)
    say(f"target-parameter pre-training, {trainable_line(module.model)}")
    _network_for_training(module.model, cfg)
    trainer, _ = make_trainer(cfg, run_dir / TPP_DIR, monitor="val/loss", max_epochs=int(cfg.tpp_epochs), resume=resume)
    fit(trainer, cfg, module, datamodule=datamodule, ckpt_path=resume)
    stop = divergence(trainer)
    if stop is not None:  # tuning would start from its NaN weights
        fail_diverged(stop, cfg, "target-parameter pre-training: ")
    return module.model


def tune(cfg: DictConfig) -> dict:
    """Forecast-PEFT / Forecast-FT / Forecast-MAE fine-tuning; returns run directory, checkpoints
    and (PEFT with a pre-trained base) the adapter-only export."""
    from forecast_peft.checkpoints import (
        TPP_KEY_MAP,
        check_compatible,
        load_checkpoint,
        load_pretrained,
        require_stage,
        shipped_model_of,
        transfer,
    )
    from forecast_peft.lit.modules import ForecastModule
    from forecast_peft.models.config import ModelConfig
    from forecast_peft.models.forecaster import TUNE_MODES
    from forecast_peft.peft.export import export_adapter
    from forecast_peft.peft.freeze import trainable_line
    from forecast_peft.training import checkpoint_paths, container, finish_run, fit, make_trainer

    mode = cfg.mode
    if mode not in TUNE_MODES:
        raise UserError(f"unknown --mode '{mode}': choose one of {', '.join(TUNE_MODES)}")
    tpp_epochs = int(cfg.tpp_epochs)  # a resumed run's own were checked when it started, and its mode is checked below
    if tpp_epochs and mode != "peft" and not cfg.resume:
        raise UserError("--tpp-epochs pre-trains PEFT prompts and adapters: use it with --mode peft")
    if tpp_epochs and not cfg.pretrained:
        raise UserError("--tpp-epochs needs a frozen pre-trained backbone: pass --pretrained CKPT")
    if mode == "peft" and not cfg.pretrained:
        say(
            "warning: --mode peft without --pretrained trains prompts and adapters on a frozen, randomly "
            "initialised backbone (an ablation at best); pass --pretrained CKPT from `fpeft pretrain`",
            file=sys.stderr,
        )
    model_cfg = container(cfg.model)
    base = None
    if cfg.pretrained:
        if cfg.resume and not Path(cfg.pretrained).exists():  # the run's saved path: its backbone has moved
            raise UserError(
                f"the run's pre-trained backbone {cfg.pretrained} does not exist: give where it is now with "
                "--pretrained PATH"
            )
        base = load_checkpoint(cfg.pretrained)
        require_stage(base, ("pretrain",), "as --pretrained")
        check_compatible(base, ModelConfig.from_dict(model_cfg))
        group = shipped_model_of(base)
        say(f"backbone: {base['path']} ({f'model={group} sizes' if group else 'sizes of its own'})")
    datamodule, run_dir, resume = _start_training(cfg)
    tpp_resume = None
    if resume is not None and in_tpp(run_dir, resume):  # stopped in its target-parameter pre-training
        tpp_resume, resume = resume, None
    module = ForecastModule(model_cfg=model_cfg, mode=mode, optim=container(cfg.optim))
    if base is not None and resume is None:
        n = load_pretrained(base, module.model, mode)
        say(f"loaded {n} pre-trained tensors from {base['path']}")
        if tpp_epochs:
            tpp_model = _target_parameter_pretraining(cfg, base, run_dir, model_cfg, datamodule, tpp_resume)
            n = transfer(tpp_model.state_dict(), module.model, TPP_KEY_MAP)
            say(f"loaded {n} tensors (backbone, prompts, adapters) from target-parameter pre-training")
    say(trainable_line(module.model))
    _network_for_training(module.model, cfg)
    trainer, ckpt = make_trainer(cfg, run_dir, monitor=MONITOR, resume=resume)
    fit(trainer, cfg, module, datamodule=datamodule, ckpt_path=resume)
    result = {"run_dir": str(run_dir), **checkpoint_paths(ckpt, run_dir)}
    if mode == "peft" and base is not None and trainer.is_global_zero:
        if result["best"]:
            module.load_state_dict(load_checkpoint(result["best"])["state_dict"])
        path, size = export_adapter(module.model, run_dir / "adapter", base["path"], model_cfg)
        print(f"adapter-only weights: {path} ({size / 1e6:.2f} MB)")
        result["adapter"] = str(path.parent)
    finish_run(result, trainer, cfg, command_line("eval", "-c", run_dir, overrides=data_overrides(cfg.data)))
    return result


def _writable(folder: Path, meant: Path) -> None:
    """A one-line error, before any work, where ``folder`` takes no new file (no permission, a
    read-only mount, a system folder): else predict and deploy found out when they wrote ``meant``,
    after their work (a split's forecasts, an export), and deploy's torch error was a traceback."""
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".fpeft-write-check-"):
            pass
    except OSError as err:
        reason = (err.strerror or type(err).__name__).lower()
        where = "it" if meant == folder else folder
        raise UserError(
            f"{meant}: cannot write in {where} ({reason}): give --out a folder this user can write to"
        ) from None


def _out_dir(path: str | Path) -> Path:
    """``--out`` of a stage that writes several files: a folder, made (and found writable) before any
    work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} is a file: give a folder, where this stage writes several files")
    path.mkdir(parents=True, exist_ok=True)
    _writable(path, path)
    return path


def _out_file(path: str | Path, name: str) -> Path:
    """``--out`` of a stage that writes one file: that file, or ``name`` in a folder given
    instead (one that exists, or any path ending in a slash); its folder is made (and found
    writable) before any work."""
    folder = str(path).endswith(("/", os.sep))
    path = Path(path)
    if folder or path.is_dir():
        path = path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    _writable(path.parent, path)
    return path


def _device(name: str):
    """``device`` of eval, predict, viz and deploy: auto (cuda where torch sees a GPU, else cpu) or
    a torch device this machine has, else a one-line error (torch's were tracebacks: an invalid
    device string, or "Torch not compiled with CUDA enabled" once the network was loaded)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and not (
        backend is not None and hasattr(backend, "is_available") and backend.is_available()
    ):
        raise ConfigError(
            f"device={name}, but this torch ({torch.__version__}) finds no {device.type} device on this machine: "
            "use device=cpu or device=auto"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device={name}, but torch finds {count(torch.cuda.device_count(), 'CUDA device')} here")
    return device


def _inference_loader(cfg: DictConfig, mode: str | None, device, scenarios=None):
    """The loader of ``cfg.split`` for ``eval`` and ``predict``: batches in fixed shapes when the
    network is compiled to record CUDA graphs (``mode``), which only a GPU does (a note says so);
    ``scenarios``: only those (``ScenarioList``)."""
    from forecast_peft.data.datamodule import ForecastDataModule
    from forecast_peft.models.choices import uses_cuda_graphs

    graphs = uses_cuda_graphs(mode)
    if graphs and device.type != "cuda":
        say(f"note: compile_mode={mode} records CUDA graphs on a GPU only; on {device.type} it compiles without them")
    return ForecastDataModule(cfg.data, static_shapes=graphs, scenarios=scenarios).loader(cfg.split)


def run_of(path: str | Path) -> Path:
    """The run directory of a checkpoint (RUN/checkpoints/x.ckpt), a run directory or an adapter
    export (RUN/adapter), resolved; for a `fpeft deploy` program, its folder."""
    path = Path(path).resolve()
    if path.is_file() and path.suffix == ".pt2":  # a `fpeft deploy` program: the folder that holds it
        return path.parent
    if path.is_file():
        return path.parent.parent
    return path.parent if path.name == "adapter" else path


def run_name(path: str | Path) -> str:
    """The run directory's name for a checkpoint, a run directory or an adapter export."""
    return run_of(path).name


def load_tuned(path: str | Path, bases=()):
    """A tuned forecasting model as an eval-mode LightningModule, and its checkpoint dict (None
    for an adapter export). ``path``: a `fpeft tune` checkpoint, a run directory (its
    last.ckpt), or a PEFT run's adapter-only export (``RUN/adapter``) on its base checkpoint
    (the one it records, or else one of ``bases`` with its content: ``--base``), or a `fpeft deploy`
    program (``.pt2``: ``deploy.ProgramModule``)."""
    from forecast_peft.checkpoints import load_checkpoint, require_stage, stage_of
    from forecast_peft.deploy import ProgramModule, is_program
    from forecast_peft.lit.modules import ForecastModule
    from forecast_peft.peft.export import CONFIG, apply_adapter, read_adapter_config

    if is_program(path):
        return ProgramModule(path).eval(), None
    if Path(path).is_dir() and (Path(path) / CONFIG).exists():
        module = ForecastModule(model_cfg=read_adapter_config(path)["model"], mode="peft", optim={})
        apply_adapter(path, model=module.model, bases=bases)
        return module.eval(), None
    ckpt = load_checkpoint(path)
    tune_it = ""
    if stage_of(ckpt) == "pretrain":
        tune_it = f" (tune this one: `{command_line('tune', '--pretrained', path)} ...`)"
    require_stage(ckpt, ("tune",), "for forecasting", f"forecasts come from `fpeft tune` checkpoints{tune_it}")
    hp = ckpt["hyper_parameters"]
    module = ForecastModule(model_cfg=hp["model_cfg"], mode=hp["mode"], optim=hp["optim"])
    module.load_state_dict(ckpt["state_dict"])
    return module.eval(), ckpt


def _check_programs(modules, device, cfg: DictConfig, compiled: bool = False) -> None:
    """`fpeft deploy` programs among the checkpoints run as exported (``ProgramModule.check_use``):
    a device, precision, compilation or attention kernel they cannot take fails before any work."""
    from forecast_peft.deploy import is_program

    for path, module in modules:
        if is_program(path):
            module.check_use(path, device, cfg.precision, compiled, str(cfg.get("attention_kernel", "auto")))


def _trainable(module) -> int:
    """A row's trainable parameters; a deployed program's are those of the module it came from."""
    from forecast_peft.deploy import ProgramModule
    from forecast_peft.peft.freeze import count_parameters

    if isinstance(module, ProgramModule):
        return module.trainable_params or 0
    return count_parameters(module.model)[0]


def _refuse_missing(checkpoints) -> None:
    """A checkpoint path that does not exist fails at once, before the seconds a stage's imports
    of Lightning and the network take."""
    for path in checkpoints:
        require_checkpoint(path)


def eval(cfg: DictConfig) -> list[dict]:  # noqa: A001 - the stage is called eval on the command line
    """Score checkpoints and baselines on a split; print the table and write the reports."""
    _refuse_missing(cfg.checkpoints)
    import pandas as pd

    from forecast_peft.data.cache import read_skipped
    from forecast_peft.data.datamodule import start_worker_server, workers_stopped
    from forecast_peft.data.preprocess import ensure_cache
    from forecast_peft.evaluation import (
        BASELINES,
        check_baselines,
        check_precision,
        evaluate,
        inference_network,
        model_predictor,
    )
    from forecast_peft.forecast_files import check_coverage, file_predictor, read_forecasts
    from forecast_peft.models.choices import compile_mode, uses_cuda_graphs
    from forecast_peft.models.compile import fresh_cache_for, mode_on
    from forecast_peft.provenance import describe, evaluation_environment, write_environment
    from forecast_peft.reports import (
        PLOT_FILE,
        add_groups,
        add_intervals,
        add_mode_ranking,
        format_means,
        format_table,
        means_over,
        plot_report,
        write_reports,
    )

    if cfg.split == "test":
        raise UserError("the test split has no ground truth: evaluate on val (or train); use `fpeft predict` for test")
    if not cfg.checkpoints and not cfg.baselines and not cfg.forecasts:
        raise UserError("nothing to evaluate: pass --checkpoint CKPT or --forecasts FILE (repeatable)")
    check_baselines(cfg.baselines)  # before any work
    check_precision(cfg.precision)  # a bad --precision fails before any work
    files = [read_forecasts(path) for path in cfg.forecasts]
    listed = _scenario_list(cfg)
    mode = compile_mode(cfg)
    start_worker_server(cfg.data)  # its imports run while the checkpoints load
    modules = _distinct_checkpoints(_runs_in_folders(cfg.checkpoints), cfg.bases)  # a bad one fails before any work
    checkpoints = [path for path, _ in modules]
    names = _row_names(cfg.baselines, modules)
    names += _file_row_names(cfg.forecasts, names)
    reference = _reference_row(cfg.reference, names, checkpoints, cfg.forecasts)
    _check_over(cfg.get("over"), checkpoints)
    device = _device(cfg.device)
    _check_programs(modules, device, cfg, mode is not None)
    kernel = attention_kernel(cfg, device.type, mode is not None)
    OmegaConf.save(cfg, _out_dir(cfg.out) / "config.yaml")
    environment = evaluation_environment(device, cfg.precision)
    write_environment(cfg.out, environment)
    ensure_cache(cfg.data, [cfg.split])
    mode = mode_on(mode, device.type)
    with workers_stopped(_inference_loader(cfg, mode, device, listed)) as loader:
        if files:  # before any scoring
            scored = loader.dataset.scenario_ids(), loader.dataset.meta_column("track_id")
            where = f"split '{cfg.split}' of {cfg.data.root}{scenes_chosen(loader.dataset)}"
            for forecasts in files:
                check_coverage(forecasts, *scored, where)
        rows, frames = [], []
        for name in cfg.baselines:
            row, frame = evaluate(name, BASELINES[name], loader, device)
            rows.append(row)
            frames.append(frame)
        network = None
        for (path, module), name in zip(modules, names[len(cfg.baselines) :]):
            module.to(device)
            if mode is not None:
                network = fresh_cache_for(module.hparams["model_cfg"], module.mode, network)
            run = model_predictor(inference_network(module.model, mode, kernel), cfg.precision, uses_cuda_graphs(mode))
            with gpu_memory_advice(inference_memory_advice(cfg)):
                row, frame = evaluate(name, run, loader, device, _trainable(module))
            row["checkpoint"] = str(path)
            row["chosen_on_this_split"] = chosen_on(path, cfg)
            values = _sweep_values(path)
            if values is not None:  # a sweep's run: its values, to group rows by
                row["values"] = values
            rows.append(row)
            frames.append(frame)
            module.cpu()
        for forecasts, name in zip(files, names[len(names) - len(files) :]):
            _say_forecast_notes(forecasts)
            row, frame = evaluate(name, file_predictor(forecasts), loader, device)
            row["forecasts"] = str(forecasts.path)
            rows.append(row)
            frames.append(frame)
    per_scene = pd.concat(frames, ignore_index=True)
    _add_run_settings(rows)
    add_intervals(rows, per_scene, reference)
    add_groups(rows, per_scene)
    add_mode_ranking(rows, per_scene)
    means = means_over(rows, str(cfg.over)) if cfg.get("over") else []
    print(format_table(rows) + format_means(means))
    _say_nonfinite_forecasts({row["name"]: _nonfinite_scenes(frame) for row, frame in zip(rows, frames)}, cfg)
    skipped = read_skipped(cfg.data.cache_dir, cfg.split)
    chosen = scenes_chosen(loader.dataset)
    scored = f"Scored on split '{cfg.split}' of {cfg.data.root}{chosen} with {describe(environment)}."
    paths = write_reports(rows, per_scene, cfg.out, skipped, scored, means)
    if cfg.plot:
        paths["plot"] = plot_report(rows, Path(cfg.out) / PLOT_FILE)
    if skipped:
        print(
            f"not scored: {count(len(skipped), 'scenario')} of split '{cfg.split}' that could not be read "
            f"({paths['md']} lists them with the reasons)"
        )
    print(f"reports: {', '.join(str(path) for path in paths.values())}")
    if checkpoints:
        words = [w for path in cfg.checkpoints for w in ("-c", path)] + ["--select", "worst"]
        words += [w for path in cfg.bases for w in ("--base", path)]
        if cfg.split != "val":
            words += ["--split", cfg.split]
        if listed is not None:
            words += ["--scenarios", cfg.scenarios]
        pictures = command_line("viz", *words, overrides=data_overrides(cfg.data))
        print(f"next: {pictures}  (pictures of the scenarios {names[len(cfg.baselines)]} forecasts worst)")
    return rows


def _nonfinite_scenes(frame) -> list[str]:
    """The scenarios of a predictor's per-scenario metrics that are NaN or inf (its forecast was)."""
    import numpy as np

    from forecast_peft.constants import METRICS

    finite = np.isfinite(frame[list(METRICS)].to_numpy(np.float64)).all(axis=1)
    return frame["scenario_id"][~finite].tolist()


def _say_nonfinite_forecasts(scenes: dict[str, list[str]], cfg: DictConfig) -> None:
    """A warning for each predictor that forecast NaN or inf somewhere (its means are NaN then),
    and whether the cache of the split holds such values (``damage_line``), which preprocessing
    never writes, or the predictor itself is the cause (a diverged checkpoint, an overflow)."""
    from forecast_peft.data.cache import damage_line

    scenes = {name: ids for name, ids in scenes.items() if ids}
    if not scenes:
        return
    for name, ids in scenes.items():
        print(
            f"warning: {name} forecast NaN or inf in {count(len(ids), 'scenario')} of split '{cfg.split}' "
            f"(scenario {first_of(ids)})",
            file=sys.stderr,
        )
    damage = damage_line(cfg.data.cache_dir, (cfg.split,))
    cause = damage or (
        f"the cache of split '{cfg.split}' holds finite values only, so the predictor is the cause (a checkpoint "
        f"of a diverged run, or values that overflow at --precision {cfg.precision})"
    )
    print(f"warning: {cause}", file=sys.stderr)


def inference_memory_advice(cfg: DictConfig) -> str:
    """What to lower after running out of GPU memory in ``eval`` or ``predict``."""
    bf16 = ", or use --precision bf16" if str(cfg.precision) == "32" else ""
    return f"lower data.eval_batch_size (now {cfg.data.eval_batch_size}){bf16}"


def _distinct_checkpoints(paths, bases) -> list[tuple[str, object]]:
    """(path, eval-mode module) of each checkpoint, loaded; a file given again (a run directory and
    its last.ckpt, a run and the sweep folder that holds it) is scored once, with a note: its rows
    would share a name, and the report's per-scene values and paired differences mixed them."""
    loaded, seen = [], {}
    for path in paths:
        module, ckpt = load_tuned(path, bases)
        key = Path(ckpt["path"] if ckpt is not None else path).resolve()  # an adapter export: its folder
        if key in seen:
            again = "given twice" if str(path) == str(seen[key]) else f"the checkpoint of -c {seen[key]} ({key})"
            say(f"note: -c {path} is {again}: scored once")
            continue
        seen[key] = path
        loaded.append((path, module))
    return loaded


def _row_names(baselines, modules) -> list[str]:
    """The report's row names, each its own: the baselines', then each checkpoint's mode and run
    name; for two checkpoints of one run, which one (a run directory stands for its last.ckpt);
    for runs of one name in different folders, the path."""
    names, runs = list(baselines), {}
    for path, module in modules:
        name = f"{module.mode} ({run_name(path)})"
        if name in names and runs.get(name) == run_of(path):
            which = "last.ckpt" if Path(path).is_dir() and Path(path).name != "adapter" else Path(path).name
            name = f"{module.mode} ({run_name(path)}: {which})"
        if name in names:
            name = f"{module.mode} ({path})"
        names.append(name)
        runs[name] = run_of(path)
    return names


def _file_row_names(paths, names: list[str]) -> list[str]:
    """The report's row names of ``--forecasts`` files: each file's name, or its path where that
    name is taken (``submission.parquet`` of two methods' folders)."""
    found = []
    for path in paths:
        name = Path(path).name
        found.append(str(path) if name in names + found else name)
    return found


def _say_forecast_notes(forecasts) -> None:
    """What scoring a ``--forecasts`` file changed in it, where anything: tracks of fewer than 6
    modes, probabilities that did not sum to 1."""
    from forecast_peft.constants import NUM_MODES

    if forecasts.short:
        say(
            f"note: --forecasts {forecasts.path}: {count(forecasts.short, 'forecast')} of fewer than {NUM_MODES} "
            f"modes; their K={NUM_MODES} metrics take the best of the modes they have"
        )
    if forecasts.unnormalised:
        say(
            f"note: --forecasts {forecasts.path}: the probabilities of {count(forecasts.unnormalised, 'forecast')} "
            "do not sum to 1 (which av2 refuses); scored divided by their sum"
        )


def _add_run_settings(rows: list[dict]) -> None:
    """Give each checkpoint's row ``settings``: its run's values of the settings in which the runs
    of the report's checkpoints differ (``runs.differing_settings``; how they ran left out, and the
    values a sweep run's name gives), where its run directory holds its config.yaml."""
    from forecast_peft.runs import HOW_IT_RAN, differing_settings, run_settings

    found = []
    for row in rows:
        run = run_of(row["checkpoint"]) if "checkpoint" in row else None
        if run is None or not (run / "config.yaml").is_file():
            continue
        try:
            saved = read_run_config(run / "config.yaml")
        except UserError:  # a damaged config.yaml: the checkpoint still scores
            continue
        found.append((row, {"stage": str(saved.stage), "run": str(run), "config": run_settings(saved)}))
    runs = [run for _, run in found]
    for (row, _), values in zip(found, differing_settings(runs, HOW_IT_RAN + ("mode",), by_folder=False)):
        if values:
            row["settings"] = values


def _runs_in_folders(paths) -> list[str]:
    """``-c`` values, where a folder of tuning runs (a ``--multirun`` sweep's, say) that is not a
    run itself stands for each run in it with a last checkpoint, in the order ``fpeft runs``
    lists them."""
    from forecast_peft.peft.export import CONFIG
    from forecast_peft.runs import find_runs

    out = []
    for path in map(str, paths):
        folder = Path(path)
        if not folder.is_dir() or (folder / "checkpoints").is_dir() or (folder / CONFIG).is_file():
            out.append(path)
            continue
        tuning = [row for row in find_runs(folder)[0] if row["stage"].startswith("tune")]
        runs = [row["run"] for row in tuning if row["resumable"] and not row["in_tpp"]]
        if not runs:
            out.append(path)  # load_tuned says what it lacks
            continue
        print(f"-c {path}: {count(len(runs), 'tuning run')} ({', '.join(Path(run).name for run in runs)})")
        unscored = [Path(row["run"]).name for row in tuning if row["run"] not in runs]
        if unscored:  # stopped before their first tuning epoch ended, or still in it
            print(f"-c {path}: not scored, no tuning checkpoint yet: {', '.join(unscored)}")
        out += runs
    return out


def chosen_on(path: str | Path, cfg: DictConfig) -> bool:
    """Whether ``path`` is a tuning run's best checkpoint (``best-*.ckpt``, or the adapter export
    made from it) and ``cfg`` scores it on the validation split that chose it: its figures are
    then optimistic, the best of several epochs on the very scenes that picked it."""
    path = Path(path)
    if path.is_file() and path.name.startswith("best-"):
        run = path.parent.parent
    elif path.is_dir() and path.name == "adapter" and any((path.parent / "checkpoints").glob("best-*.ckpt")):
        run = path.parent
    else:
        return False
    saved = run / "config.yaml"
    if cfg.split != "val" or not saved.is_file():
        return False
    try:
        cache = OmegaConf.select(read_run_config(saved), "data.cache_dir")
    except UserError:  # a damaged config.yaml: the note cannot be given, the checkpoint still scores
        return False
    return cache is not None and Path(cache).resolve() == Path(cfg.data.cache_dir).resolve()


def _reference_row(reference, names: list[str], checkpoints: list[str], files=()) -> str | dict[str, str] | None:
    """The report row that the others are compared with: ``reference`` as a row name (a baseline,
    a checkpoint's or a ``--forecasts`` file's row), as one of the checkpoints or files (the same
    path, however written) or as the name of one checkpoint's run; None (the first row) if unset.
    ``KEY=VALUE`` that is none of these gives each run of a sweep its own (``_sweep_references``).
    ``names``: the baselines' rows, the checkpoints' and the files'."""
    if reference is None:
        return None
    reference = str(reference)
    if reference in names:
        return reference
    for row, path in zip(names[len(names) - len(files) :], files):
        if Path(path).resolve() == Path(reference).resolve():
            return row
    rows = names[len(names) - len(files) - len(checkpoints) : len(names) - len(files)]
    same_path = [row for row, c in zip(rows, checkpoints) if Path(c).resolve() == Path(reference).resolve()]
    same_run = [row for row, c in zip(rows, checkpoints) if run_name(c) == reference]
    for found in (same_path, same_run):
        if len(found) == 1:
            return found[0]
    if "=" in reference:
        return _sweep_references(reference, rows, checkpoints)
    found = same_path or same_run
    if found:  # two checkpoints of one run, or runs of one name in different folders
        raise UserError(
            f"reference '{reference}' names {len(found)} rows ({', '.join(found)}): give one of them by its row "
            "name or its checkpoint's path"
        )
    raise UserError(f"reference '{reference}' is no row of this report: use one of {', '.join(names)}")


def _check_over(key: str | None, checkpoints: list[str]) -> None:
    """``--over KEY`` averages the runs of a sweep over KEY: at least one checkpoint must be a run
    whose name gives it (``seed=1,tpp_epochs=4``), else a one-line error before any scoring."""
    if not key:
        return
    values = [_sweep_values(c) for c in checkpoints]
    keys = sorted({k for v in values if v for k in v})
    if not keys:
        raise UserError(
            f"--over {key} averages the runs of a sweep, and no checkpoint is a sweep's run (a run directory named "
            "by its values, such as seed=1,tpp_epochs=4)"
        )
    if key not in keys:
        raise UserError(
            f"--over {key}: no checkpoint is a run of a sweep over {key} (their names give {', '.join(keys)})"
        )


def _sweep_values(path: str) -> dict[str, str] | None:
    """The swept values in a run's name (``seed=1,tpp_epochs=4``), or None for another name."""
    from forecast_peft.sweep import swept_values

    return swept_values(run_name(path))


def _sweep_references(reference: str, rows: list[str], checkpoints: list[str]) -> dict[str, str]:
    """``--reference KEY=VALUE`` over the runs of a sweep: each run is compared with the run of
    the same values but KEY=VALUE (``tpp_epochs=0``: every TPP run with the run of its seed
    without TPP); runs without one are not compared."""
    key, value = reference.split("=", 1)
    values = {row: _sweep_values(c) for row, c in zip(rows, checkpoints)}
    by_values = {tuple(sorted(v.items())): row for row, v in values.items() if v is not None}
    pairs = {}
    for row, mine in values.items():
        if mine is not None and key in mine:
            pairs[row] = by_values.get(tuple(sorted({**mine, key: value}.items())), row)
    if not any(theirs != row for row, theirs in pairs.items()):
        raise UserError(f"reference '{reference}': no run of this report differs from a {reference} run in {key} alone")
    return pairs


def deploy(cfg: DictConfig) -> Path:
    """A tuned network as one file that runs with torch alone (``forecast_peft.deploy``)."""
    if not cfg.checkpoint:
        raise UserError("deploy needs --checkpoint CKPT (a `fpeft tune` checkpoint, run directory or adapter export)")
    require_checkpoint(cfg.checkpoint)
    import json
    import time

    from forecast_peft.deploy import INPUTS, PRECISION_NAMES, compile_package, export, is_program, save, spec
    from forecast_peft.evaluation import check_precision, inference_network

    if is_program(cfg.checkpoint):  # before the seconds of loading it
        raise UserError(f"{cfg.checkpoint} is a deployed program already: deploy the checkpoint it came from")
    precision = check_precision(cfg.precision)
    device = _device(cfg.device)
    module, _ = load_tuned(cfg.checkpoint, cfg.bases)
    out = _out_file(cfg.out, "model.pt2")
    began = time.perf_counter()
    trainable = _trainable(module)
    program, checks = export(inference_network(module.model).to(device).eval(), device, precision)
    model_cfg = json.loads(json.dumps(module.hparams["model_cfg"], default=list))
    save(program, out, spec(cfg.checkpoint, module.mode, model_cfg, trainable, device, checks, precision))
    worst = max(c["max_diff_m"] for c in checks)
    bf16 = ""
    if precision == "bf16":
        rounding = max(c["bf16_rounding_m"] for c in checks)
        bf16 = (
            f" in bf16, whose rounding moves them up to {rounding:.2g} m from float32's there (on a split: `fpeft eval "
            f"-c {cfg.checkpoint} --precision bf16` against --precision 32)"
        )
    print(
        f"deployable {module.mode} network ({device.type}, {PRECISION_NAMES[precision]}): {out} (its inputs and "
        f"outputs: {out.with_suffix('.json')}), exported in {time.perf_counter() - began:.1f} s; on {len(checks)} "
        f"batches of other sizes it forecasts within {worst:.1g} m of the network{bf16}. Run it with torch alone: "
        f"torch.export.load('{out}').module()({', '.join(name for name, *_ in INPUTS)})"
    )
    if cfg.aoti:
        package = out.with_suffix(".aoti.pt2")
        began = time.perf_counter()
        checks = compile_package(program, package, device, checks)
        print(
            f"compiled by AOTInductor in {time.perf_counter() - began:.0f} s: {package}, within "
            f"{max(c['max_diff_m'] for c in checks):.1g} m of the program; from Python: "
            f"torch._inductor.aoti_load_package('{package}')(...), from C++: torch::inductor::AOTIModelPackageLoader "
            f"(a runner: `python -m forecast_peft.cpp build/forecast`, then `build/forecast {package} IN.pt OUT.pt`)"
        )
    return out


def predict(cfg: DictConfig) -> Path:
    """An Argoverse 2 leaderboard submission (parquet) for a split, or a CSV table of its forecasts."""
    if not cfg.checkpoint:
        raise UserError("predict needs --checkpoint CKPT (a `fpeft tune` checkpoint)")
    require_checkpoint(cfg.checkpoint)  # before the seconds of the imports, as eval's and viz's
    import numpy as np
    import torch

    from forecast_peft.data.cache import REPORT_FILE, read_skipped
    from forecast_peft.data.datamodule import start_worker_server, workers_stopped
    from forecast_peft.data.preprocess import ensure_cache
    from forecast_peft.evaluation import check_precision, inference_network, model_predictor, to_device, to_world
    from forecast_peft.forecast_files import TABLE_SUFFIXES, forecast_table, write_table
    from forecast_peft.models.choices import compile_mode, uses_cuda_graphs
    from forecast_peft.models.compile import mode_on

    check_precision(cfg.precision)  # a bad --precision fails before any work
    mode = compile_mode(cfg)
    device = _device(cfg.device)
    kernel = attention_kernel(cfg, device.type, mode is not None)
    start_worker_server(cfg.data)
    module, _ = load_tuned(cfg.checkpoint, cfg.bases)
    _check_programs([(cfg.checkpoint, module)], device, cfg, mode is not None)
    out = _out_file(cfg.out, "submission.parquet")
    ensure_cache(cfg.data, [cfg.split])
    module.to(device)
    mode = mode_on(mode, device.type)
    run = model_predictor(inference_network(module.model, mode, kernel), cfg.precision, uses_cuda_graphs(mode))
    outputs = []  # kept on the device until the end: no batch waits for the one before
    with (
        workers_stopped(_inference_loader(cfg, mode, device)) as loader,
        gpu_memory_advice(inference_memory_advice(cfg)),
    ):
        for batch in progress_bar(loader, desc=f"predict {cfg.split}", unit="batch"):
            y_hat, pi = run(to_device(batch, device))
            # copies: a view would keep the loader's whole batch buffer alive
            frame = (batch["origin"].clone(), batch["theta"].clone())
            outputs.append((y_hat, pi, *frame, batch["scenario_id"], batch["track_id"]))
    predictions, nonfinite = {}, []
    for y_hat, pi, origin, theta, scenario_ids, track_ids in outputs:
        probs = torch.softmax(pi.double(), dim=-1).cpu().numpy()
        world = to_world(y_hat.double().cpu(), origin.double(), theta.double()).numpy()
        finite = np.isfinite(probs).all(axis=1) & np.isfinite(world.reshape(len(world), -1)).all(axis=1)
        for i, sid in enumerate(scenario_ids):
            if not finite[i]:  # av2 refuses a submission that holds a NaN
                nonfinite.append(sid)
                continue
            p = probs[i] / probs[i].sum()
            predictions[sid] = (p, {track_ids[i]: world[i].astype(np.float64)})
    _say_nonfinite_forecasts({cfg.checkpoint: nonfinite}, cfg)
    if nonfinite and not predictions:
        raise UserError(f"no submission written: {cfg.checkpoint} forecast NaN or inf in every scenario")
    if out.name.endswith(TABLE_SUFFIXES):
        write_table(forecast_table(predictions), out)
        print(f"forecasts of {count(len(predictions), 'scenario')} (a row per scenario, mode and step): {out}")
    else:
        from av2.datasets.motion_forecasting.eval.submission import ChallengeSubmission

        ChallengeSubmission(predictions).to_parquet(out)
        print(f"submission with {count(len(predictions), 'scenario')}: {out}")
    if nonfinite:
        print(
            f"warning: the submission leaves out {count(len(nonfinite), 'such scenario')} (av2 refuses NaN), and the "
            "leaderboard expects every scenario of the split",
            file=sys.stderr,
        )
    skipped = read_skipped(cfg.data.cache_dir, cfg.split)
    if skipped:
        print(
            f"warning: the submission lacks {count(len(skipped), 'scenario')} of split '{cfg.split}' that could not "
            f"be read, and the leaderboard expects every scenario of the split: "
            f"{Path(cfg.data.cache_dir) / cfg.split / REPORT_FILE} lists them with the reasons"
        )
    return out


VIZ_SELECT = ("first", "worst", "best")


def _rank_by(cfg: DictConfig) -> str:
    """The per-scenario value ``--select worst|best`` ranks by (``cfg.by``): a metric, or minFDE6
    at a horizon (``HORIZON_COLUMNS``); a one-line error for another, or for --by without a ranking."""
    from forecast_peft.constants import HORIZON_COLUMNS, METRICS

    by = str(cfg.get("by", "minFDE6"))
    if by not in METRICS + HORIZON_COLUMNS:
        raise UserError(f"unknown --by '{by}' (choose {', '.join(METRICS + HORIZON_COLUMNS)})")
    if by != "minFDE6" and cfg.select == "first":
        raise UserError(f"--by {by} ranks the scenarios that --select worst or --select best draws: give one of them")
    return by


def viz(cfg: DictConfig) -> list[Path]:
    """PNG pictures of the predictions of one or more checkpoints, ``--forecasts`` files and
    baselines (a panel each, side by side, in that order): ``cfg.num`` scenarios of a split in
    cache order (``select=first``), those the first panel's predictor forecasts worst or best
    (largest or smallest minFDE6, or ``cfg.by``: which scores the whole split first), or one
    ``cfg.scenario``. Where the split has ground truth, each panel gives the scene's minADE6 and
    minFDE6."""
    _refuse_missing(cfg.checkpoints)
    from forecast_peft.data.datamodule import ForecastDataModule, start_worker_server, workers_stopped
    from forecast_peft.data.preprocess import ensure_cache
    from forecast_peft.evaluation import (
        BASELINES,
        check_baselines,
        check_precision,
        evaluate,
        inference_network,
        model_predictor,
        to_device,
    )
    from forecast_peft.forecast_files import check_coverage, file_predictor, read_forecasts
    from forecast_peft.metrics import scene_metrics
    from forecast_peft.viz import draw_scene

    if not cfg.checkpoints and not cfg.baselines and not cfg.forecasts:
        raise UserError(
            "viz needs --checkpoint CKPT (a `fpeft tune` checkpoint; repeat it to compare several), --forecasts FILE "
            "or --baseline NAME"
        )
    check_baselines(cfg.baselines)
    if cfg.select not in VIZ_SELECT:
        raise UserError(f"unknown --select '{cfg.select}' (choose {', '.join(VIZ_SELECT)})")
    ranked = cfg.select != "first"
    by = _rank_by(cfg)
    if ranked and cfg.scenario:
        raise UserError(f"--scenario draws one scenario, --select {cfg.select} chooses them: give one of the two")
    if cfg.scenario and cfg.get("scenarios"):
        raise UserError("--scenario draws one scenario, --scenarios FILE lists them: give one of the two")
    listed = _scenario_list(cfg)
    if ranked and cfg.split == "test":
        raise UserError(f"--select {cfg.select} ranks scenarios by their error, and the test split has no ground truth")
    check_precision(cfg.precision)
    files = [read_forecasts(path) for path in cfg.forecasts]
    if ranked:  # scores the split with the loader's workers
        start_worker_server(cfg.data)
    modules = _distinct_checkpoints(_runs_in_folders(cfg.checkpoints), cfg.bases)
    names = _row_names([], modules)  # the checkpoints' panels first, then the files', then the baselines'
    names += _file_row_names(cfg.forecasts, names) + list(cfg.baselines)
    out = _out_dir(cfg.out)
    ensure_cache(cfg.data, [cfg.split])
    data = ForecastDataModule(cfg.data, scenarios=listed)
    dataset = data.dataset(cfg.split)
    ids = dataset.scenario_ids()
    device = _device(cfg.device)
    _check_programs(modules, device, cfg)
    predictors = [model_predictor(inference_network(module.model.to(device)), cfg.precision) for _, module in modules]
    predictors += [file_predictor(forecasts) for forecasts in files] + [BASELINES[name] for name in cfg.baselines]
    tracks, where = dataset.meta_column("track_id"), f"split '{cfg.split}' of {cfg.data.root}{scenes_chosen(dataset)}"

    def check_files(chosen, used: str) -> None:
        for forecasts in files:
            check_coverage(forecasts, [ids[i] for i in chosen], [tracks[i] for i in chosen], where, used)

    if ranked and not modules:  # a file's panel first ranks the split: it needs every scenario
        check_files(range(len(ids)), "ranked")
    if cfg.scenario:
        city = dataset.city_left_out(cfg.scenario)
        if city is not None:
            raise UserError(
                f"scenario '{cfg.scenario}' is in {city}, which data.cities={list_text(dataset.cities)} leaves out"
            )
        if cfg.scenario not in ids:
            root = Path(cfg.data.root)
            splits = sorted(d for d in root.iterdir() if d.is_dir() and d.name != cfg.split) if root.is_dir() else []
            found = [d.name for d in splits if (d / cfg.scenario).is_dir()]
            where = f" (it is in the {found[0]} split: add --split {found[0]})" if found else ""
            raise UserError(f"scenario '{cfg.scenario}' is not in the {cfg.split} split of {cfg.data.cache_dir}{where}")
        indices = [ids.index(cfg.scenario)]
    elif ranked:
        with workers_stopped(data.loader(cfg.split)) as loader, gpu_memory_advice(inference_memory_advice(cfg)):
            _, frame = evaluate(names[0], predictors[0], loader, device)
        worst = cfg.select == "worst"  # a NaN forecast (a diverged model) is the worst; ties keep the id order
        order = frame.sort_values(by, ascending=not worst, na_position="first" if worst else "last", kind="stable")
        position = {sid: i for i, sid in enumerate(ids)}
        indices = [position[sid] for sid in order["scenario_id"].head(int(cfg.num))]
    else:
        indices = list(range(min(int(cfg.num), len(ids))))
    check_files(indices, "drawn")
    panel_files = [None] * len(modules) + files + [None] * len(cfg.baselines)
    paths = []
    step = int(cfg.data.eval_batch_size)
    for start in range(0, len(indices), step):  # a large --num in batches, as eval forms them
        chunk = indices[start : start + step]
        batch = dataset.__getitems__(chunk)
        forecasts = []
        for name, predict in zip(names, predictors):
            with gpu_memory_advice(inference_memory_advice(cfg)):
                y_hat, pi = (t.cpu() for t in predict(to_device(batch, device)))
            errors = scene_metrics(y_hat, pi, batch["y"][:, 0]) if dataset.with_future else None
            forecasts.append((name, y_hat, pi, errors))
        for i, index in enumerate(chunk):
            panels = []
            for (name, y_hat, pi, errors), file in zip(forecasts, panel_files):
                # a file's track of fewer modes: those alone, not the copies that fill it up to 6
                k = len(pi[i]) if file is None else int(file.modes[file.rows[ids[index], tracks[index]]])
                if errors is not None:
                    name += f"\nminADE6 {errors['minADE6'][i]:.2f} m, minFDE6 {errors['minFDE6'][i]:.2f} m"
                    if by not in ("minADE6", "minFDE6"):  # what ranked it
                        name += f", {by} {errors[by][i]:.2f}{'' if by == 'MR6' else ' m'}"
                panels.append((name, y_hat[i][:k], pi[i][:k]))
            rank = f"{cfg.select}{start + i + 1:03d}_" if ranked else ""
            paths.append(draw_scene(batch, i, panels, out / f"{rank}{ids[index]}.png", ids[index]))
    which = f", the {cfg.select} of {count(len(ids), 'scenario')} by the {by} of {names[0]}" if ranked else ""
    print(f"wrote {count(len(paths), 'picture')} to {out}{which}")
    return paths


def demo(cfg: DictConfig) -> list[dict]:
    from forecast_peft.demo import run_demo

    return run_demo(cfg)


def runs(cfg: DictConfig) -> list[dict]:
    """The pre-training and tuning runs under ``cfg.root``, as a table."""
    from forecast_peft.runs import find_runs, format_runs, plot_runs, sort_runs

    root = Path(cfg.root)
    if not root.exists():
        raise UserError(f"{root} does not exist: give the folder that holds the runs (default data/runs)")
    if not root.is_dir():
        raise UserError(f"{root} is a file, not a folder of runs")
    sort_runs([], cfg.sort)  # a bad --sort fails before any reading
    rows, unreadable = find_runs(root)
    rows = sort_runs(rows, cfg.sort)
    for line in unreadable:
        print(f"skipped {line}", file=sys.stderr)
    print(format_runs(rows) if rows else f"no pre-training or tuning runs under {root}")
    if cfg.plot and rows:
        print(f"learning curves: {plot_runs(rows, cfg.plot, root)}")
    return rows
