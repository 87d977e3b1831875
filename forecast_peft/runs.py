"""`fpeft runs`: the training runs under a folder, one line each, to find the one to evaluate.

Everything comes from what a run leaves in its directory: ``config.yaml`` (stage, mode, model,
data, epochs asked for), ``logs/metrics.csv`` (epochs done, the monitored validation value),
``checkpoints/last.ckpt`` (whether ``--resume`` can continue it; ``tpp/checkpoints/last.ckpt``
for a tuning run stopped in its target-parameter pre-training), ``finished.json`` (whether
its fit ended, so that a run short of its epochs stopped early rather than being cut off) and
``.lock`` (locked by the process that trains in it: whether an unfinished run is running or was
interrupted).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from forecast_peft.config import FINISHED_FILE, finished_record, in_tpp, resume_target, run_holder
from forecast_peft.config_files import flatten
from forecast_peft.constants import MONITOR
from forecast_peft.errors import UserError, list_text
from forecast_peft.models.config import BACKBONE_FIELDS, ModelConfig, shipped_model
from forecast_peft.reports import markdown_table
from forecast_peft.sweep import swept_values

TRAINING_STAGES = {"pretrain": "val/loss", "tune": MONITOR}
COLUMNS = ("run", "stage", "model", "data", "epochs", "best", "best epoch", "last")
# settings that do not change what a run learns, left out where runs are compared: where it is and
# how it started, and how it ran, which changes its speed or its logs (workers, device, validation
# and logging intervals, compilation, attention kernel)
HOW_IT_RAN = (
    ("stage", "run_dir", "runs_root", "resume", "auto_resume", "data.cache_dir")
    + ("data.eval_batch_size", "data.num_workers", "data.pin_memory", "data.worker_start", "data.eval_order")
    + ("data.slot_multiple", "data.preprocess_workers", "data.shard_size")
    + ("trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy")
    + ("trainer.log_every_n_steps", "trainer.check_val_every_n_epoch", "trainer.enable_progress_bar")
    + ("compile", "compile_mode", "attention_kernel", "tensorboard")
)
# what the other columns of `fpeft runs` show: stage (mode), model (backbone), data, epochs
IN_COLUMNS = ("mode", "backbone", "data.root", "data.cities", "data.train_fraction", "trainer.max_epochs")
MAX_SETTINGS = 6  # per row; more are counted
LAST_CHECKPOINT = "/checkpoints/last.ckpt"
PLOT_FILE = "learning_curves.png"  # what --plot writes into a folder it is given


def find_runs(root: str | Path) -> tuple[list[dict], list[str]]:
    """Every pre-training and tuning run under ``root`` (any depth), oldest first by directory
    name within each folder; and a line for each ``config.yaml`` that could not be read."""
    rows, unreadable = [], []
    for saved in sorted(Path(root).rglob("config.yaml")):
        try:
            cfg = OmegaConf.load(saved)
        except Exception as err:  # a truncated or hand-edited file: say so, list the others
            unreadable.append(f"{saved}: not readable YAML ({type(err).__name__})")
            continue
        if isinstance(cfg, DictConfig) and cfg.get("stage") in TRAINING_STAGES:
            rows.append(_describe(saved.parent, cfg))
    return rows, unreadable


def sort_runs(rows: list[dict], by: str) -> list[dict]:
    """``path`` (as found) or ``best``: by stage, then by the best validation value, runs without
    one last."""
    if by == "path":
        return rows
    if by == "best":
        return sorted(rows, key=lambda r: (r["stage"], r["best"] is None, r["best"] or 0.0))
    raise UserError(f"unknown --sort '{by}': choose path or best")


def _describe(run: Path, cfg: DictConfig) -> dict:
    monitor = TRAINING_STAGES[cfg.stage]
    stage = f"tune {cfg.get('mode')}" if cfg.stage == "tune" else "pretrain"
    settings = run_settings(cfg)
    last = resume_target(run)[1]  # what --resume would continue from
    row = {
        "run": str(run),
        "stage": stage,
        "model": settings["backbone"],
        "data": _data(cfg),
        "max_epochs": OmegaConf.select(cfg, "trainer.max_epochs"),
        "epochs_done": 0,
        "monitor": monitor,
        "best": None,
        "best_epoch": None,
        "last": None,
        "resumable": last.is_file(),
        "in_tpp": in_tpp(run, last),
        "finished": (run / FINISHED_FILE).is_file(),
        "diverged_epoch": finished_record(run).get("diverged_epoch"),
        "running": run_holder(run),
        "config": settings,
    }
    log = read_log(run)
    # epochs that ended: each logs its mean training loss once (older runs: their validation rows)
    ended = next((log.dropna(subset=[k]) for k in ("train/epoch_loss", monitor) if k in log), None)
    if ended is not None and len(ended):
        row["epochs_done"] = int(ended["epoch"].max()) + 1
    rounds = _validation_rows(log, monitor)
    if len(rounds):
        values = rounds.dropna(subset=[monitor])  # the best of the finite values, as Lightning ranks them
        if len(values):
            best = values.loc[values[monitor].idxmin()]
            row.update(best=float(best[monitor]), best_epoch=int(best["epoch"]))
        row["last"] = float(rounds[monitor].iloc[-1])  # NaN where the last round's was
    row["curves"] = _curves(log, monitor)  # from the same read as the table (a run may still be logging)
    return row


def _validation_rows(log: pd.DataFrame, monitor: str) -> pd.DataFrame:
    """The rows of a run's log that its validation rounds wrote: those of an epoch with no value
    outside ``val/*``. Lightning writes a NaN metric as ``nan``, which reads back as an empty cell,
    so a round whose every value was NaN is a row of its epoch and step alone."""
    if monitor not in log or "epoch" not in log:
        return log.iloc[0:0]
    others = [c for c in log.columns if c not in ("epoch", "step") and not c.startswith("val/")]
    return log[log["epoch"].notna() & log[others].isna().all(axis=1)]


def read_log(run: str | Path) -> pd.DataFrame:
    """A run's ``logs/metrics.csv``; empty where it is missing or cannot be read."""
    metrics = Path(run) / "logs" / "metrics.csv"
    try:
        return pd.read_csv(metrics) if metrics.is_file() else pd.DataFrame()
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        return pd.DataFrame()


def _curves(log: pd.DataFrame, monitor: str) -> dict[str, pd.Series]:
    """A run's learning curves from its log, by epoch: ``train`` (the mean training loss of each
    epoch) and ``val`` (the monitored validation value, where it validated)."""
    out = {}
    for name, key in (("train", "train/epoch_loss"), ("val", monitor)):
        values = log.dropna(subset=[key]) if key in log else pd.DataFrame(columns=["epoch", key])
        out[name] = pd.Series(values[key].to_numpy(float), index=values["epoch"].to_numpy(int), name=key)
    return out


def plot_runs(rows: list[dict], path: str | Path, root: str | Path) -> Path:
    """A PNG of the runs' learning curves (``path``, or ``path/learning_curves.png`` for a folder):
    a row of two panels per stage (pre-training, tuning), the epochs' mean training loss and the
    monitored validation value, a line per run named by its folder under ``root``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    stages = sorted({row["stage"].split()[0] for row in rows})  # pretrain, tune
    fig, axes = plt.subplots(len(stages), 2, figsize=(12, 4.5 * len(stages)), squeeze=False, layout="constrained")
    for (train_ax, val_ax), stage in zip(axes, stages):
        group = [row for row in rows if row["stage"].split()[0] == stage]
        for row in group:
            lines = row["curves"]
            label = f"{Path(row['run']).relative_to(root)} ({row['stage']})"  # '.' for a root that is a run
            for ax, series in ((train_ax, lines["train"]), (val_ax, lines["val"])):
                ax.plot(series.index, series.to_numpy(), marker="o", ms=3, label=label)
        train_ax.set_title(f"{stage}: training loss (mean of each epoch)", fontsize=10)
        val_ax.set_title(f"{stage}: {group[0]['monitor']} (validation)", fontsize=10)
        for ax in (train_ax, val_ax):
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        val_ax.legend(fontsize=7)
    path = Path(path)
    if path.is_dir():
        path = path / PLOT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _data(cfg: DictConfig) -> str:
    """The data root, with the cities a run chose (``data.cities``) and the share of its training
    split a data-efficiency run used."""
    fraction = OmegaConf.select(cfg, "data.train_fraction", default=1.0)
    cities = OmegaConf.select(cfg, "data.cities", default=None) or []
    chosen = [f"cities {list_text(cities)}"] if cities else []
    if isinstance(fraction, (int, float)) and fraction < 1:
        chosen.append(f"{fraction:g} of train")
    return f"{OmegaConf.select(cfg, 'data.root')}" + (f" ({', '.join(chosen)})" if chosen else "")


def _model_name(model) -> str:
    """The shipped model's name (tiny, small, forecast_mae) or, for other sizes, the width."""
    try:
        sizes = ModelConfig.from_dict(OmegaConf.to_container(model)).to_dict()
    except (TypeError, ValueError):
        return "?"
    return shipped_model(sizes) or f"custom ({sizes['embed_dim']} wide)"


def _number(value: float | None) -> str:
    """``-`` for no value, ``nan`` for a NaN one (a validation round that gave NaN)."""
    if value is None:
        return "-"
    return "nan" if math.isnan(value) else f"{value:.3f}"


def format_runs(rows: list[dict]) -> str:
    """A markdown table of ``find_runs``'s rows: best and last are the monitored validation
    value (tuning: val/minFDE6, pre-training: val/loss), lower is better. Where runs of a stage
    differ in settings the other columns do not show (``optim.lr``, ``seed``, ``pretrained``),
    a last column gives each run's values of them, less those its folder's name gives (a sweep's
    ``seed=1,optim.lr=0.005``)."""
    settings = differing_settings(rows, HOW_IT_RAN + IN_COLUMNS)
    if not any(settings):
        return "\n".join(markdown_table(COLUMNS, (_cells(row) for row in rows)))
    cells = (_cells(row) + [settings_text(values) or "-"] for row, values in zip(rows, settings))
    return "\n".join(markdown_table((*COLUMNS, "settings"), cells))


def run_settings(cfg: DictConfig) -> dict[str, object]:
    """A run's configuration as flat settings (``optim.lr``), its backbone's sizes as one,
    ``backbone``: the shipped model's name or the width (``_model_name``)."""
    flat = flatten(OmegaConf.to_container(cfg, resolve=False))
    sizes = tuple(f"model.{field}" for field in BACKBONE_FIELDS)
    settings = {key: value for key, value in flat.items() if not _under(key, sizes)}
    return {"backbone": _model_name(cfg.get("model") or OmegaConf.create({})), **settings}


def differing_settings(rows: list[dict], left_out: tuple[str, ...], by_folder: bool = True) -> list[dict]:
    """For each row (``stage``, ``run``, ``config``: ``run_settings``), its values of the settings
    that differ between the runs it is compared with, those of its stage (pre-training or tuning)
    that have them, in its folder (``by_folder``) or anywhere; in the order of its configuration,
    without the ``left_out`` settings (a name stands for its section too: ``data``, ``data.root``)
    and those its folder's name gives (a sweep's ``seed=1,optim.lr=0.005``)."""
    groups = [(row["stage"].split()[0], str(Path(row["run"]).parent) if by_folder else "") for row in rows]
    seen: dict[tuple, set[str]] = {}
    for group, row in zip(groups, rows):
        for key, value in row.get("config", {}).items():
            seen.setdefault((*group, key), set()).add(repr(value))
    out = []
    for group, row in zip(groups, rows):
        named = swept_values(Path(row["run"]).name) or {}  # a sweep run's keys
        out.append(
            {
                key: value
                for key, value in row.get("config", {}).items()
                if len(seen[(*group, key)]) > 1 and not _under(key, left_out) and key not in named
            }
        )
    return out


def _under(key: str, names: tuple[str, ...]) -> bool:
    return any(key == name or key.startswith(f"{name}.") for name in names)


def settings_text(values: dict) -> str:
    """``differing_settings``' values of a row as ``key=value`` words, at most ``MAX_SETTINGS``
    (the others counted); a backbone checkpoint as its run."""

    def text(value) -> str:
        if isinstance(value, float):
            return f"{value:g}"
        if isinstance(value, list):
            return "[" + ",".join(map(text, value)) + "]"
        return str(value).removesuffix(LAST_CHECKPOINT)  # a backbone: its run

    shown = [f"{key}={text(value)}" for key, value in list(values.items())[:MAX_SETTINGS]]
    more = len(values) - MAX_SETTINGS
    return " ".join(shown) + (f" (+{more} more)" if more > 0 else "")


def _cells(row: dict) -> list[str]:
    epochs = f"{row['epochs_done']}/{row['max_epochs']}"
    short = row["max_epochs"] is not None and 0 <= row["epochs_done"] < row["max_epochs"]
    tpp = " in target-parameter pre-training" if row["in_tpp"] else ""  # no tuning epoch yet
    if row["running"]:
        epochs += f" (running{tpp}: pid {row['running']})"
    elif not row["resumable"]:
        epochs += " (no checkpoint)"
    elif row["diverged_epoch"] is not None:
        epochs += f" (diverged in epoch {row['diverged_epoch']})"
    elif short and row["finished"]:
        epochs += " (stopped early)"
    elif short or tpp:  # without a lock to test (an older run), a running and an interrupted run look alike
        epochs += f" (interrupted{tpp})" if row["running"] == "" else f" (unfinished: running, or interrupted{tpp})"
    best = "-" if row["best"] is None else f"{_number(row['best'])} {row['monitor']}"
    best_epoch = "-" if row["best_epoch"] is None else str(row["best_epoch"])
    return [row["run"], row["stage"], row["model"], row["data"], epochs, best, best_epoch, _number(row["last"])]
