"""The `fpeft` command line: parses options, composes the Hydra config, calls a stage.

Every command accepts Hydra overrides after its options, e.g.
``fpeft pretrain data.root=data/synth/a trainer.max_epochs=2 trainer.devices=4``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from typer.exceptions import TyperException

from forecast_peft.cli_help import epilog
from forecast_peft.errors import (
    CompileError,
    StorageError,
    Terminated,
    UserError,
    lost_worker,
    os_error_line,
    traceback_file,
    worker_ends_left_to_the_loader,
)
from forecast_peft.runtime import keep_freed_memory, launch_rank

app = typer.Typer(
    name="fpeft",
    help="Motion forecasting on Argoverse 2: pre-train a scene transformer (Forecast-MAE), adapt it "
    "cheaply (Forecast-PEFT / Forecast-FT) and report minADE/minFDE. Any command takes Hydra "
    "overrides after its options (key=value; pretrain and tune: trainer.<arg> for any Lightning Trainer "
    "argument), and settings files with --config FILE (YAML, as --print-config prints); pretrain -m and "
    "tune -m sweep comma-separated values (seed=1,2,3), one run per combination.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def overrides_argument(example: str):
    """The stage's Hydra overrides, with an example of its own settings."""
    return typer.Argument(None, help=f"Hydra overrides (key=value), e.g. {example}.", show_default=False)


TRAINING_OVERRIDES = overrides_argument("data.root=DIR trainer.max_epochs=2")
INFERENCE_OVERRIDES = overrides_argument("data.root=DIR data.eval_batch_size=128")
CONFIG_FILE = typer.Option(
    None,
    "--config",
    help="Settings from a YAML file, as --print-config prints them or a run saves them (RUN/config.yaml: its "
    "run_dir left out, the new run gets its own), nested or dotted keys; the overrides given win over it, as "
    "does a later --config over an earlier one.",
    metavar="FILE",
    show_default=False,
)
PRINT_CONFIG = typer.Option(
    False,
    "--print-config",
    help="Print the composed config and exit without running. Its values are checked as a run checks them, "
    "but for the Trainer's against this machine (devices, processes), which waits for the run unless a "
    "trainer.* value is set or srun or torchrun started fpeft.",
)
CHECKPOINT = typer.Option(
    None, "--checkpoint", "-c", help="Tuned checkpoint, run directory or adapter export (RUN/adapter)."
)
CHECKPOINT_OR_PROGRAM = typer.Option(
    None,
    "--checkpoint",
    "-c",
    help="Tuned checkpoint, run directory, adapter export (RUN/adapter) or `fpeft deploy` program (.pt2).",
)
CHECKPOINTS = typer.Option(
    None,
    "--checkpoint",
    "-c",
    help="Tuned checkpoint, run directory, adapter export RUN/adapter, `fpeft deploy` program (.pt2), or a folder "
    "of runs such as a sweep's (each tuning run in it); repeatable.",
)
BASE = typer.Option(
    None,
    "--base",
    help="Base checkpoint of an adapter export (-c RUN/adapter) that is no longer where the export recorded it "
    "(repeatable; matched by content).",
)
MULTIRUN = typer.Option(
    False,
    "--multirun",
    "-m",
    help="A sweep: one run for every combination of the overrides' comma-separated values (seed=1,2,3 "
    "tpp_epochs=0,4), one after the other, each in RUN_DIR/<its values>; --print-config lists the runs.",
)
RESUME = typer.Option(
    None,
    help="Run directory or checkpoint to continue from, with the run's own settings; overrides given "
    "with it (trainer.max_epochs, optim.lr, data.batch_size, ...) apply from where it stopped.",
)
AUTO_RESUME = typer.Option(
    None,
    "--auto-resume",
    help="With run_dir=DIR: go on with the run in DIR if it holds one (from its last finished epoch), start it "
    "there if not; the same command serves a batch job's first start and its restarts (SLURM requeue).",
    show_default=False,
)
PRECISION = typer.Option(
    None, help="Inference precision: 32 (default) or bf16 (about 2x faster on a GPU; the output heads stay float32)."
)
FORECASTS = typer.Option(
    None,
    "--forecasts",
    metavar="FILE",
    help="Forecasts made elsewhere, beside the checkpoints' (repeatable): an Argoverse 2 submission (parquet, as "
    "the leaderboard takes and `fpeft predict` writes) or a `fpeft predict --out NAME.csv` table, with the focal "
    "track of every scenario taken; its row or panel is named after the file.",
)
SCENARIOS = typer.Option(
    None,
    "--scenarios",
    metavar="FILE",
    help="Only the scenarios FILE lists: one id per line, or a CSV file's scenario_id column (a report's "
    "per_scenario.csv, filtered), or a parquet or .csv.gz table's (a submission).",
)


def _print_version(value: bool) -> None:
    if value:
        from forecast_peft.provenance import version_lines

        typer.echo("\n".join(version_lines()))
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False,
        "--version",
        help="Print forecast-peft's version (and the git commit of its source, for a checkout), then those of "
        "Python, torch and Lightning, and exit.",
        is_eager=True,
        callback=_print_version,
    ),
) -> None:
    pass


def _run(
    stage: str,
    overrides: list[str] | None,
    print_config: bool,
    extra: list[str] | None = None,
    multirun: bool = False,
    files: list[Path] | None = None,
) -> None:
    from forecast_peft import config, stages
    from forecast_peft.config_files import file_overrides

    overrides = config.expand_home(list(extra or []) + list(overrides or []))
    if files:  # ahead of the command line's, which win
        overrides = file_overrides(stage, files, overrides) + overrides
    if multirun:
        from forecast_peft.sweep import multirun as sweep

        keep_freed_memory()
        sweep(stage, overrides, print_only=print_config)
        return
    cfg = config.compose(stage, overrides, print_only=print_config)
    if print_config:
        typer.echo(config.to_yaml(cfg), nl=False)
        return
    if stage in ONE_PROCESS_STAGES and launch_rank() > 0:
        # srun or torchrun started it several times over (a job script's `srun fpeft eval ...` beside
        # its training steps): each process ran all of it, on one device, into the same files
        print(f"fpeft: {stage} runs in the first process of a launch; process {launch_rank()} leaves it to that one")
        return
    keep_freed_memory()
    getattr(stages, stage)(cfg)


# stages that run in one process: started several times over, only the first process runs them
ONE_PROCESS_STAGES = ("synth", "convert", "eval", "predict", "deploy", "viz")


def _path_or_override(value: Path | None, overrides: list[str] | None) -> tuple[Path | None, list[str]]:
    """A command's optional path argument, or, when what stands there is ``key=value`` (and no
    such path exists), the first of the overrides: ``fpeft runs runs_root=DIR``."""
    overrides = list(overrides or [])
    if value is not None and "=" in str(value) and not value.exists():
        return None, [str(value), *overrides]
    return value, overrides


def _opt(key: str, value) -> list[str]:
    """Turn a Typer option into a Hydra override; None means 'not given'."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        items = ",".join(f"'{v}'" for v in value)
        return [f"{key}=[{items}]"]
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        return [f"{key}='{value}'"]
    return [f"{key}={value}"]


@app.command(help="Write synthetic scenarios in the Argoverse 2 on-disk format (styles: see --style).")
def synth(
    out: Path | None = typer.Argument(None, help="Dataset root; scenarios go to OUT/<split>/<id>/."),
    split: str | None = typer.Option(None, help="Split to write: train, val or test."),
    num_scenarios: int | None = typer.Option(None, "--num-scenarios", "-n", help="How many scenarios."),
    seed: int | None = typer.Option(None, help="Random seed; the same seed gives the same files."),
    style: str | None = typer.Option(
        None,
        help="Traffic style: suburban (wide curved roads, calm drivers) or downtown (dense grid, "
        "narrow lanes, aggressive turns).",
    ),
    workers: int | None = typer.Option(None, help="Worker processes."),
    stats: Path | None = typer.Option(None, "--stats", help="Print scene statistics of an existing split DIR."),
    overrides: list[str] | None = overrides_argument("synth.workers=4"),
    config_file: list[Path] | None = CONFIG_FILE,
    print_config: bool = PRINT_CONFIG,
) -> None:
    out, overrides = _path_or_override(out, overrides)
    if stats is not None:
        from forecast_peft.data.synth.stats import print_stats

        print_stats(stats)
        return
    extra = (
        _opt("synth.out", out)
        + _opt("synth.split", split)
        + _opt("synth.num_scenarios", num_scenarios)
        + _opt("synth.seed", seed)
        + _opt("synth.style", style)
        + _opt("synth.workers", workers)
    )
    _run("synth", overrides, print_config, extra, files=config_file)


@app.command(
    help="Cut driving logs of one's own (tracks in CSV or parquet, lanes in GeoJSON or an AV2 map archive) into "
    "Argoverse 2 scenarios, which every other stage then reads: resampled to 10 Hz, windows of 11 s (5 s for "
    "the test split), one scenario per window for the mover that travels farthest in it (convert.focal_by: or "
    "turns most, changes speed most, comes closest to another). A tracks file has the "
    "columns track_id, time_s (or timestamp_ns), x and y, in metres in the map's frame; optional: log_id (else "
    "the file's name), object_type (AV2's names; vehicle where absent), heading (radians), vx and vy (m/s), city. "
    "Scenarios already written are left as they are.",
    epilog=epilog("convert"),
)
def convert(
    out: Path | None = typer.Argument(None, help="Dataset root; scenarios go to OUT/<split>/<id>/."),
    tracks: list[Path] | None = typer.Option(
        None,
        "--tracks",
        "-t",
        help="A tracks file (CSV or parquet), or a folder of them (repeatable).",
        show_default=False,
    ),
    map_file: Path | None = typer.Option(
        None,
        "--map",
        help="The lanes: a GeoJSON FeatureCollection of LineString centrelines (properties, all optional: id, "
        "width, lane_type VEHICLE/BIKE/BUS, is_intersection, successors, predecessors) or an AV2 "
        "log_map_archive JSON.",
        show_default=False,
    ),
    split: str | None = typer.Option(None, help="Split to write: train (default), val or test (the history only)."),
    city: str | None = typer.Option(None, help="The scenarios' city where the tracks have no city column."),
    overrides: list[str] | None = overrides_argument("convert.stride_s=5 convert.origin=[500000,4612000]"),
    config_file: list[Path] | None = CONFIG_FILE,
    print_config: bool = PRINT_CONFIG,
) -> None:
    out, overrides = _path_or_override(out, overrides)
    extra = (
        _opt("convert.out", out)
        + _opt("convert.tracks", tracks)
        + _opt("convert.map", map_file)
        + _opt("convert.split", split)
        + _opt("convert.city", city)
    )
    _run("convert", overrides, print_config, extra, files=config_file)


@app.command(
    help="Extract features of every split under data.root into the packed cache (parallel, resumable).",
    epilog=epilog("preprocess"),
)
def preprocess(
    overrides: list[str] | None = overrides_argument("data.root=DIR data.preprocess_workers=8"),
    config_file: list[Path] | None = CONFIG_FILE,
    print_config: bool = PRINT_CONFIG,
) -> None:
    _run("preprocess", overrides, print_config, files=config_file)


@app.command(help="Masked-autoencoder pre-training (Forecast-MAE) on the training split.", epilog=epilog("pretrain"))
def pretrain(
    resume: Path | None = RESUME,
    auto_resume: bool | None = AUTO_RESUME,
    multirun: bool = MULTIRUN,
    overrides: list[str] | None = TRAINING_OVERRIDES,
    config_file: list[Path] | None = CONFIG_FILE,
    print_config: bool = PRINT_CONFIG,
) -> None:
    _run(
        "pretrain",
        overrides,
        print_config,
        _opt("resume", resume) + _opt("auto_resume", auto_resume),
        multirun,
        files=config_file,
    )


@app.command(
    help="Adapt to forecasting: --mode peft (frozen backbone), ft (all trainable) or baseline.", epilog=epilog("tune")
)
def tune(
    mode: str | None = typer.Option(None, help="peft, ft or baseline."),
    pretrained: Path | None = typer.Option(
        None,
        help="Pre-trained MAE checkpoint or its run directory; the model sizes come from it (omit: from scratch).",
    ),
    tpp_epochs: int | None = typer.Option(
        None,
        "--tpp-epochs",
        help="Pre-train the prompts and adapters for N epochs (masked reconstruction, backbone frozen) before PEFT.",
    ),
    resume: Path | None = RESUME,
    auto_resume: bool | None = AUTO_RESUME,
    multirun: bool = MULTIRUN,
    overrides: list[str] | None = TRAINING_OVERRIDES,
    config_file: list[Path] | None = CONFIG_FILE,
    print_config: bool = PRINT_CONFIG,
) -> None:
    extra = (
        _opt("mode", mode)
        + _opt("pretrained", pretrained)
        + _opt("tpp_epochs", tpp_epochs)
        + _opt("resume", resume)
        + _opt("auto_resume", auto_resume)
    )
    _run("tune", overrides, print_config, extra, multirun, files=config_file)


@app.command(
    name="eval",
    help="minADE/minFDE/MR/brier-minFDE of checkpoints and baselines: table, JSON, CSV.",
    epilog=epilog("eval"),
)
def eval_(
    checkpoint: list[Path] | None = CHECKPOINTS,
    split: str | None = typer.Option(None, help="Split to evaluate (val or train)."),
    out: Path | None = typer.Option(None, help="Directory for report.json, report.md and per-scenario CSV."),
    forecasts: list[Path] | None = FORECASTS,
    scenarios: Path | None = SCENARIOS,
    reference: str | None = typer.Option(
        None,
        help="Row the others are compared with over the same scenarios (paired differences with 95% intervals): "
        "a baseline name, one of the --checkpoint or --forecasts values or a run's name; or, for the runs of a "
        "sweep, KEY=VALUE: each run against the run of its other values with KEY=VALUE (tpp_epochs=0). "
        "Default: the first row.",
    ),
    over: str | None = typer.Option(
        None,
        metavar="KEY",
        help="For the runs of a sweep: each setting's mean over KEY (seed: over the seeds of each setting), with "
        "its 95% interval across the runs, and the mean of their differences from --reference; report_means.csv.",
    ),
    base: list[Path] | None = BASE,
    precision: str | None = PRECISION,
    plot: bool | None = typer.Option(
        None,
        "--plot",
        help="Also draw report.png: each row's minFDE6 1-6 s ahead with its 95% interval, and its paired difference "
        "from the reference row at each horizon.",
        show_default=False,
    ),
    overrides: list[str] | None = INFERENCE_OVERRIDES,
    config_file: list[Path] | None = CONFIG_FILE,
    print_config: bool = PRINT_CONFIG,
) -> None:
    extra = _opt("checkpoints", checkpoint) + _opt("split", split) + _opt("out", out) + _opt("precision", precision)
    extra += _opt("scenarios", scenarios) + _opt("reference", reference) + _opt("over", over) + _opt("bases", base)
    extra += _opt("plot", plot) + _opt("forecasts", forecasts)
    _run("eval", overrides, print_config, extra, files=config_file)


@app.command(
    help="Write an Argoverse 2 leaderboard submission (parquet) for a split, or its forecasts as a CSV table.",
    epilog=epilog("predict"),
)
def predict(
    checkpoint: Path | None = CHECKPOINT_OR_PROGRAM,
    split: str | None = typer.Option(None, help="Split to predict (default test)."),
    out: str | None = typer.Option(
        None,
        help="Submission file to write, or a folder (existing, or ending in /) for FOLDER/submission.parquet; a "
        "name ending in .csv (or .csv.gz) writes the forecasts as a table instead: scenario_id, track_id, mode "
        "(0 the most probable), probability, step (1-60, tenths of a second ahead), x, y (metres, the scenarios' "
        "frame).",
    ),
    base: list[Path] | None = BASE,
    precision: str | None = PRECISION,
    overrides: list[str] | None = INFERENCE_OVERRIDES,
    config_file: list[Path] | None = CONFIG_FILE,
    print_config: bool = PRINT_CONFIG,
) -> None:
    extra = _opt("checkpoint", checkpoint) + _opt("split", split) + _opt("out", out) + _opt("precision", precision)
    _run("predict", overrides, print_config, extra + _opt("bases", base), files=config_file)


@app.command(
    help="Write a tuned network as one file that runs with torch alone, no forecast_peft (torch.export's .pt2), "
    "for a service or a vehicle's software: the history features of a batch of scenes in (any number of "
    "scenes, agents and lanes), the focal agents' modes in world coordinates, the most probable first, and "
    "their probabilities out. NAME.json beside it lists the inputs and outputs.",
    epilog=epilog("deploy"),
)
def deploy(
    checkpoint: Path | None = CHECKPOINT,
    out: str | None = typer.Option(
        None, help="The .pt2 file to write, or a folder (existing, or ending in /) for FOLDER/model.pt2."
    ),
    base: list[Path] | None = BASE,
    precision: str | None = typer.Option(
        None,
        help="32 (default) or bf16: the network under bfloat16 autocast inside the program (about 2x faster on a "
        "GPU; inputs, outputs and output heads stay float32); eval, predict and viz score it with the same "
        "--precision.",
    ),
    overrides: list[str] | None = overrides_argument("device=cpu"),
    config_file: list[Path] | None = CONFIG_FILE,
    print_config: bool = PRINT_CONFIG,
) -> None:
    extra = _opt("checkpoint", checkpoint) + _opt("out", out) + _opt("bases", base) + _opt("precision", precision)
    _run("deploy", overrides, print_config, extra, files=config_file)


@app.command(
    help="Draw predictions: lanes, histories, ground truth and the 6 modes with probabilities (PNG), a panel per "
    "checkpoint; --select worst draws the scenarios the first checkpoint forecasts worst.",
    epilog=epilog("viz"),
)
def viz(
    checkpoint: list[Path] | None = CHECKPOINTS,
    split: str | None = typer.Option(None, help="Split to draw from (default val)."),
    scenario: str | None = typer.Option(None, help="Scenario id to draw."),
    scenarios: Path | None = SCENARIOS,
    num: int | None = typer.Option(None, help="Number of scenarios to draw (default 4)."),
    select: str | None = typer.Option(
        None,
        help="Which scenarios: first (default: in cache order), worst or best (the largest or smallest minFDE6 "
        "of the first checkpoint, or --by: scores the whole split first; the files are numbered by rank).",
    ),
    by: str | None = typer.Option(
        None,
        help="What --select worst/best ranks by: minFDE6 (default), minADE6, minFDE1, minADE1, brier-minFDE6, MR6, "
        "or minFDE6 at a horizon, minFDE6_1s to minFDE6_5s (the scenes forecast worst early on).",
    ),
    forecasts: list[Path] | None = FORECASTS,
    baseline: list[str] | None = typer.Option(
        None,
        "--baseline",
        help="A simple predictor drawn beside the checkpoints, a panel of its own: constant_velocity, "
        "kinematic_modes or lane_following; repeatable.",
    ),
    out: Path | None = typer.Option(None, help="Output directory."),
    base: list[Path] | None = BASE,
    precision: str | None = PRECISION,
    overrides: list[str] | None = INFERENCE_OVERRIDES,
    config_file: list[Path] | None = CONFIG_FILE,
    print_config: bool = PRINT_CONFIG,
) -> None:
    extra = _opt("checkpoints", checkpoint) + _opt("split", split) + _opt("scenario", scenario) + _opt("num", num)
    extra += _opt("select", select) + _opt("out", out) + _opt("bases", base) + _opt("precision", precision)
    extra += _opt("baselines", baseline or None) + _opt("scenarios", scenarios) + _opt("by", by)
    extra += _opt("forecasts", forecasts)
    _run("viz", overrides, print_config, extra, files=config_file)


@app.command(
    help="List the pre-training and tuning runs under a folder (default data/runs): epochs done, best and last "
    "validation value (val/minFDE6 or val/loss); a run short of its epochs is marked running (with its pid), "
    "interrupted (--resume continues it) or stopped early."
)
def runs(
    root: Path | None = typer.Argument(None, help="Folder to look in, at any depth (default: runs_root)."),
    sort: str | None = typer.Option(None, help="path (default) or best: per stage, the best validation value first."),
    plot: Path | None = typer.Option(
        None, help="Also draw the runs' learning curves into this PNG (training loss and validation value by epoch)."
    ),
    overrides: list[str] | None = overrides_argument("runs_root=DIR"),
    config_file: list[Path] | None = CONFIG_FILE,
    print_config: bool = PRINT_CONFIG,
) -> None:
    root, overrides = _path_or_override(root, overrides)
    _run(
        "runs", overrides, print_config, _opt("root", root) + _opt("sort", sort) + _opt("plot", plot), files=config_file
    )


@app.command(
    help="The whole pipeline on built-in synthetic data (synth, preprocess, pretrain, tune, eval). "
    "It takes its own settings only (demo.*, run_dir, runs_root).",
    epilog=epilog("demo"),
)
def demo(
    overrides: list[str] | None = typer.Argument(
        None, help="The demo's settings, e.g. demo.tune_epochs=2 demo.model=small.", show_default=False
    ),
    config_file: list[Path] | None = CONFIG_FILE,
    print_config: bool = PRINT_CONFIG,
) -> None:
    _run("demo", overrides, print_config, files=config_file)


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and an exit code, never a traceback."""
    try:
        with worker_ends_left_to_the_loader():
            app(args=argv, prog_name="fpeft", standalone_mode=False)
    except typer.Exit as err:
        return err.exit_code
    except typer.Abort:
        typer.echo("fpeft: aborted", err=True)
        return 130
    except TyperException as err:  # click's usage errors: unknown command, option or value
        message = err.format_message() if hasattr(err, "format_message") else str(err)
        if type(err).__name__ == "NoArgsIsHelpError":  # `fpeft` alone: its help, not an error line
            typer.echo(message)
            return err.exit_code
        typer.echo(f"fpeft: error: {message}", err=True)
        return getattr(err, "exit_code", 2)
    except CompileError as err:  # torch's bug, as a rule: its traceback goes to a file for the report
        path = traceback_file(err)
        typer.echo(f"fpeft: error: {err}" + (f" (torch's traceback: {path})" if path else ""), err=True)
        return err.exit_code
    except UserError as err:
        typer.echo(f"fpeft: error: {err}", err=True)
        return err.exit_code
    except Terminated as err:
        typer.echo(f"fpeft: {err}", err=True)
        return err.exit_code
    except StorageError as err:
        typer.echo(f"fpeft: error: {err}", err=True)
        return err.exit_code
    except KeyboardInterrupt:
        typer.echo("fpeft: interrupted", err=True)
        return 130
    except OSError as err:  # the file system's own refusals: permissions, a full disk, a missing file
        typer.echo(f"fpeft: error: {os_error_line(err)}", err=True)
        return 1
    except RuntimeError as err:  # a DataLoader worker's end (eval, predict, viz; training says it itself)
        line = lost_worker(err)
        if line is None:
            raise
        typer.echo(f"fpeft: error: {line}", err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
