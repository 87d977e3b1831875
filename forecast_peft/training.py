"""Trainer construction, run directories and resuming, shared by the training stages."""

from __future__ import annotations

import atexit
import builtins
import csv
import io
import json
import logging
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import NoReturn

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.plugins import CheckpointIO, TorchCheckpointIO
from pytorch_lightning.plugins.environments import ClusterEnvironment
from pytorch_lightning.trainer.states import RunningStage
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from forecast_peft import slurm
from forecast_peft.checkpoints import load_checkpoint, require_stage, stage_of
from forecast_peft.config import (
    FINISHED_FILE,
    claim_run_dir,
    command_line,
    continues_when_restarted,
    finished_record,
    in_tpp,
    make_run_dir,
    release_run_dir,
    resume_target,
)
from forecast_peft.config_checks import lightning_trainer
from forecast_peft.data.files import write_bytes_atomic
from forecast_peft.errors import (
    StorageError,
    Terminated,
    UserError,
    WorkerError,
    count,
    ended_by,
    lost_worker,
    os_error_line,
    out_of_memory_line,
    raisers,
)
from forecast_peft.lit.progress import StepProgressBar, TrainingLines
from forecast_peft.provenance import ENVIRONMENT_LOG, record_fit_start
from forecast_peft.runtime import launch_rank, on_terminal, say


class _DropNoise(logging.Filter):
    """Drops two of Lightning's lines at every fit that tell a user nothing: its "Tip" lines,
    which advertise a cloud logging service, and its note that it loads the training data to
    count the steps (for the learning-rate schedule)."""

    NOISE = ("Tip:", "Loading `train_dataloader` to estimate number of stepping batches")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in self.NOISE)


logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_DropNoise())
# emitted by Lightning's own use of torch's pytree with this torch version, once per run
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)


# a run directory holds checkpoints only when it is resumed: a new run is refused one (check_run_dir)
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


# the position (epoch, optimizer step) up to which the logs of a run that starts from no
# checkpoint keep what its directory holds: nothing. The rows and events there are of an epoch cut
# short, which the run logs again: an earlier try that stopped in its first epoch, run again in
# place, or a tuning stopped in its first epoch after its target-parameter pre-training ended
NOTHING_KEPT = (-1, 0)


class RunLogger(CSVLogger):
    """Lightning's CSVLogger into ``RUN/logs/metrics.csv``, except that a resumed run keeps the
    rows logged up to its checkpoint at ``kept`` (epoch, optimizer step; Lightning's deletes the
    metrics.csv it finds, and with it the history of the epochs before). Rows past it, of an epoch
    the interruption cut short, go, without Lightning's warning: the run logs that epoch again."""

    def __init__(self, run_dir: Path, kept: tuple[int, int] = NOTHING_KEPT):
        super().__init__(save_dir=str(run_dir), name="logs", version="")
        self._kept = kept

    @property
    def experiment(self):
        if self._experiment is not None or rank_zero_only.rank != 0:
            return super().experiment  # the other processes of a multi-GPU run write no logs
        rows = _rows_until(Path(self.log_dir) / "metrics.csv", self._kept)
        with warnings.catch_warnings():  # "previous log files will be deleted": their rows are kept here
            warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
            writer = super().experiment
        writer.metrics[:0] = rows
        return writer


def tensorboard_logger(run_dir: Path, kept: tuple[int, int] = NOTHING_KEPT):
    """TensorBoard's logs in ``RUN/tensorboard`` (``tensorboard=true``), beside the CSV ones. A
    resumed run drops what the logs hold past its checkpoint's step (``kept``: epoch, step), as the
    CSV logs do: TensorBoard purges it when it reads the run's events (``purge_step``)."""
    from pytorch_lightning.loggers import TensorBoardLogger

    purge = {"purge_step": kept[1]}
    # tensorboardX names an event file by the second and the host alone: a run resumed within the
    # second it stopped in wrote over the stopped run's file. The nanoseconds keep every file apart,
    # and in the order written, in which TensorBoard reads a folder's files (by name)
    unique = {"filename_suffix": f".{time.time_ns()}"}
    return TensorBoardLogger(
        save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False, **unique, **purge
    )


def _checkpoint_position(checkpoint: str) -> tuple[int, int]:
    """The epoch and the optimizer step at which ``checkpoint`` was written."""
    # two numbers of a checkpoint that resolve_resume and Lightning read in full: mapped, not read
    state = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)
    return int(state["epoch"]), int(state["global_step"])


def _rows_until(path: Path, position: tuple[int, int]) -> list[dict]:
    """The rows of ``path`` (a metrics.csv) logged up to ``position``, a checkpoint's epoch and
    optimizer step: epochs it had finished, steps it had taken."""
    if not path.is_file():
        return []
    epoch, step = position
    rows, unreadable = [], []
    with path.open(newline="", errors="replace") as file:
        # NUL characters (a crash's zero-filled tail) stop Python 3.10's csv reader with an error, and
        # read as text on later versions: here they read as undecodable bytes do, on every version
        reader = csv.DictReader(line.replace("\0", "\ufffd") for line in file)
        while True:
            try:
                raw = next(reader)
            except StopIteration:
                break
            except csv.Error:  # a field past csv's size limit, say: the reader goes on after it
                unreadable.append(reader.line_num + 1)  # the line that failed is not counted yet
                continue
            try:  # a row cut short by a crash or a full disk: said below, not a traceback
                row = {key: float(value) for key, value in raw.items() if key and value not in ("", None)}
            except (TypeError, ValueError):
                unreadable.append(reader.line_num)
                continue
            if row.get("epoch", -1) > epoch or ("epoch" not in row and row.get("step", -1) >= step):
                continue
            rows.append({key: int(value) if key in ("epoch", "step") else value for key, value in row.items()})
    if unreadable:
        say(
            f"note: {path}: left out of the resumed run's log, {count(len(unreadable), 'row')} that could not be "
            f"read (the first at line {unreadable[0]})"
        )
    return rows


def resolve_resume(cfg: DictConfig) -> tuple[Path, str | None]:
    """The run directory to write into and the checkpoint to continue from (``--resume`` takes a
    run directory or a checkpoint inside one)."""
    if not cfg.get("resume"):
        run_dir = make_run_dir(cfg)
        say(f"run: {run_dir}")
        return run_dir, None
    run_dir, ckpt = resume_target(cfg.resume)
    if not ckpt.exists():
        again = " (a run stopped before its first epoch ended: run the same command without --resume)"
        raise UserError(
            f"nothing to resume: {ckpt} does not exist" + (again if (run_dir / "config.yaml").is_file() else "")
        )
    if launch_rank() == 0:
        claim_run_dir(run_dir)  # before anything in it changes
    epoch = finished_record(run_dir).get("diverged_epoch")
    if epoch is not None:
        raise UserError(
            f"{run_dir} diverged in epoch {epoch} (train/epoch_loss not finite), so its last.ckpt holds the diverged "
            "weights and has nothing to go on from: run it again with a lower optim.lr, in a new run directory"
        )
    check_resumable(load_checkpoint(ckpt), cfg)
    phase = " (target-parameter pre-training; tuning follows it)" if in_tpp(run_dir, ckpt) else ""
    say(f"resuming from {ckpt}{phase}")
    if launch_rank() == 0:
        (run_dir / FINISHED_FILE).unlink(missing_ok=True)  # it goes on: finished again when its fit ends
        if (run_dir / "config.yaml").is_file():  # what it goes on with: its own, and this command's overrides
            OmegaConf.save(cfg, run_dir / "config.yaml")
    return run_dir, str(ckpt)


def check_resumable(ckpt: dict, cfg: DictConfig) -> None:
    """The checkpoint to resume must be of this stage, mode and model: one line naming what differs.
    A tuning run may go on from its target-parameter pre-training (PEFT's, by ``tpp_epochs``)."""
    tpp = cfg.stage == "tune" and stage_of(ckpt) == "tpp"
    if not tpp:
        require_stage(ckpt, (cfg.stage,), f"to resume `fpeft {cfg.stage}`")
    hp = ckpt["hyper_parameters"]
    diff = [f"{key} {a!r} vs {b!r}" for key, a, b in differences(hp.get("model_cfg"), container(cfg.model), "model")]
    mode = "peft" if tpp else hp.get("mode")
    if cfg.stage == "tune" and mode != cfg.mode:
        diff.insert(0, f"mode {mode!r} vs {cfg.mode!r}")
    if diff:
        raise UserError(f"{ckpt['path']}: cannot resume with another model (checkpoint vs now: {'; '.join(diff)})")
    key, max_epochs = ("tpp_epochs", cfg.tpp_epochs) if tpp else ("trainer.max_epochs", cfg.trainer.get("max_epochs"))
    if max_epochs is not None and 0 <= max_epochs < ckpt.get("epoch", 0):
        raise UserError(
            f"{ckpt['path']}: the run is past epoch {ckpt['epoch']}, and {key}={max_epochs} ends "
            f"before that: give a larger {key} to train on"
        )


def differences(a, b, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, a's value, b's value) wherever two nested dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += differences(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    return [] if a == b else [(prefix, a, b)]


class RecordEnvironment(pl.Callback):
    """Append each start of the fit (the first and every resume) to ``RUN/environment.jsonl``, from
    the first process only (``provenance.record_fit_start``)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ENVIRONMENT_LOG

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            record_fit_start(self.path, trainer)


class ResumeHint(pl.Callback):
    """After Ctrl-C (Lightning shuts the run down and exits), say how to continue it. Keeps the
    loop that an exception stopped (``stopped_in``: Lightning's stage, which it resets after)."""

    def __init__(self, stage: str, run_dir: Path):
        self.stage, self.run_dir = stage, Path(run_dir)
        self.stopped_in: RunningStage | None = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.stopped_in = trainer.state.stage
        if isinstance(exception, KeyboardInterrupt) and trainer.is_global_zero:
            print(f"interrupted: {resume_hint(self.stage, self.run_dir)}", file=sys.stderr, flush=True)


def resume_hint(stage: str, run_dir: str | Path) -> str:
    """How to go on with a run that was stopped: ``--resume`` where it has a last checkpoint."""
    if resume_target(run_dir)[1].exists():  # what `--resume RUN` would continue from
        return f"`{command_line(stage, '--resume', run_dir)}` continues it from its last finished epoch"
    return "no epoch of it had finished, so there is nothing to resume: run it again"


def fit(trainer: pl.Trainer, cfg: DictConfig, module: pl.LightningModule, **kwargs) -> None:
    """``trainer.fit``, where a SIGTERM (a scheduler's time limit, ``kill``) ends the command with
    exit code 143 and the way to resume the run. Lightning stops the fit after the current step
    and raises a SystemExit without a code, so the command would end with exit code 0, as if it
    had finished; or, where the DataLoader workers got the signal too, with their traceback. The
    other processes of a multi-GPU run end with the same code, in silence. A resumed fit's
    training order starts at its checkpoint's epoch (``ForecastDataModule.start_epoch``)."""
    datamodule, ckpt_path = kwargs.get("datamodule"), kwargs.get("ckpt_path")
    if datamodule is not None:  # one datamodule serves target-parameter pre-training, then tuning
        datamodule.start_epoch = resumed_epoch(ckpt_path) if ckpt_path else 0
    _STOP.update(sigterm=False, requeue=False)
    try:
        with slurm.requeue_signal_calls(lambda: _stop_for_requeue(trainer)), passing_sigterm_on(trainer):
            trainer.fit(module, **kwargs)
    except BaseException as caught:
        remove_spawn_error_files(caught)
        err = spawned_error(caught, cfg)  # with ddp_spawn: what the process raised, or its end in a line
        if isinstance(err, OSError):  # a full disk, say: the run stops where its last checkpoint is
            raise StorageError(os_error_line(err, resume_hint(cfg.stage, cfg.run_dir))) from None
        if isinstance(err, WorkerError):  # a worker's one line (no shared memory, a changed cache): may come mid-run
            raise StorageError(f"{err}; {resume_hint(cfg.stage, cfg.run_dir)}") from None
        if err is not caught and isinstance(err, (UserError, StorageError)):
            raise err from None
        if isinstance(err, torch.cuda.OutOfMemoryError):
            raise UserError(out_of_memory_line(err, memory_advice(trainer, cfg))) from None
        if launch_rank() > 0 and lost_another_process(err):  # the first process stopped: it says why
            print(f"fpeft: process {launch_rank()} stopped with the first process of the run", file=sys.stderr)
            raise SystemExit(1) from None
        if lost_another_process(err) and not getattr(trainer, "received_sigterm", False):  # another one stopped
            hint = resume_hint(cfg.stage, cfg.run_dir)
            raise StorageError(f"{stopped_process(trainer)}; {hint}") from None
        # the first process has received_sigterm; the others stop on its word (SIGTERMException);
        # the processes that ddp_spawn started stop with Terminated (StopAtStep)
        sigterm = getattr(trainer, "received_sigterm", False) or isinstance(err, (SIGTERMException, Terminated))
        worker = None if sigterm else lost_worker(err)  # (the same SIGTERM ends the workers too)
        if worker is not None:  # the system's out-of-memory killer, as a rule
            raise StorageError(f"{worker}; {resume_hint(cfg.stage, cfg.run_dir)}") from None
        if not sigterm:
            raise
        if launch_rank() > 0:  # the first process says it, once
            raise SystemExit(143) from None
        if _STOP["requeue"]:
            raise Terminated(requeued(cfg)) from None
        raise Terminated(f"terminated (SIGTERM): {resume_hint(cfg.stage, cfg.run_dir)}") from None
    finally:
        stop_loader_workers(trainer)


def stop_loader_workers(trainer: pl.Trainer) -> None:
    """End the DataLoader workers of the loaders ``trainer`` fitted with, finished or failed
    (``data.datamodule.stop_workers``). Lightning ends those of the loop that was running when
    the fit stopped only: a fit that failed in its first validation (the sanity check) kept its
    training loader's workers until a later garbage collection, which waited 5 s for each."""
    from forecast_peft.data.datamodule import stop_workers

    for loaders in (getattr(trainer, "train_dataloader", None), getattr(trainer, "val_dataloaders", None)):
        for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
            if loader is not None:
                stop_workers(loader)


def remove_spawn_error_files(err: BaseException) -> None:
    """With ``trainer.strategy=ddp_spawn`` each process that raises writes its traceback to a file
    in the system's temporary folder (``pytorch-errorfile-*.pickle``), which torch reads into the
    error it raises in the command's process (``err``) but leaves there: each failed or stopped
    run (a SLURM time limit, say) left one per process. By then torch has waited for every
    process to end; this removes the files that its ``ProcessContext``, the raiser of ``err``,
    named. Any other error is left alone."""
    from torch.multiprocessing import ProcessContext

    context = next((r for r in raisers(err) if isinstance(r, ProcessContext)), None)
    for path in getattr(context, "error_files", None) or []:
        if isinstance(path, str):
            with suppress(OSError):  # a process that raised nothing wrote no file
                os.unlink(path)


# the last line of a Python traceback: the exception's qualified type and its message
_EXCEPTION_LINE = re.compile(r"^(?P<type>[A-Za-z_][\w.]*): (?P<message>.*)$")
_OS_ERROR_TEXT = re.compile(
    r"^\[Errno (?P<errno>\d+)\] (?P<strerror>[^:]*)(?:: '(?P<file>.*?)'(?: -> '(?P<file2>.*)')?)?$"
)


def spawned_error(err: BaseException, cfg: DictConfig) -> BaseException:
    """With ``trainer.strategy=ddp_spawn`` the fit runs in processes that the command started, and
    torch hands their failure back as the text of a traceback (``ProcessRaisedException``) or an
    exit signal (``ProcessExitedException``): the command printed some 100 lines where the same
    failure under ``ddp`` is one. This rebuilds the exception the process raised where fpeft says
    it in a line (the file system's refusals, CUDA's out-of-memory error, fpeft's own errors), and
    says a process's end by a signal (SIGKILL: the system's out-of-memory killer, say), or that of
    one of its DataLoader workers (``lost_worker``), as a ``StorageError`` with the way to resume.
    Any other error, and ``err`` itself when it is neither, is returned as it was (a traceback is
    what a bug wants)."""
    from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

    from forecast_peft import errors

    if isinstance(err, ProcessExitedException):
        how = ended_by(err.signal_name) if err.signal_name else f"ended with exit code {err.exit_code}"
        return StorageError(f"process {err.error_index} of the run {how}; {resume_hint(cfg.stage, cfg.run_dir)}")
    if not isinstance(err, ProcessRaisedException):
        return err
    lines = err.msg.rstrip().splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith('  File "')]
    after = [line for line in lines[frames[-1] + 1 :] if not line.startswith(" ")] if frames else []
    match = _EXCEPTION_LINE.match(after[0]) if after else None  # the line after the last frame's code
    if match is None:
        return err
    kind, message = match["type"], match["message"]
    builtin = getattr(builtins, kind, None)
    if isinstance(builtin, type) and issubclass(builtin, OSError):
        parts = _OS_ERROR_TEXT.match(message)
        if parts is None:
            return builtin(message)
        return OSError(int(parts["errno"]), parts["strerror"], parts["file"], None, parts["file2"])
    if kind in ("torch.OutOfMemoryError", "torch.cuda.OutOfMemoryError"):
        return torch.cuda.OutOfMemoryError(message)
    worker = lost_worker(RuntimeError(message)) if kind == "RuntimeError" else None
    if worker is not None:  # a DataLoader worker of the process ended
        return StorageError(f"{worker}; {resume_hint(cfg.stage, cfg.run_dir)}")
    module, _, name = kind.rpartition(".")
    found = getattr(errors, name, None) if module == errors.__name__ else None
    if isinstance(found, type) and issubclass(found, (UserError, StorageError, Terminated)):
        return found(message)
    return err


def stopped_process(trainer: pl.Trainer, wait: float = 0.2) -> str:
    """Which other process of the run stopped, as the first process lost it: one that Lightning's
    own launcher started and a signal ended (SIGKILL: the system's out-of-memory killer, which
    leaves no message) is named with its signal, after up to ``wait`` seconds for it to be gone
    (a killed process is gone as its connections close; one that said why itself takes longer to
    shut down, and Lightning's launcher kills every process within 5 s of a child's failure)."""
    children = getattr(getattr(trainer.strategy, "launcher", None), "procs", None) or []
    deadline = time.monotonic() + wait
    while children and time.monotonic() < deadline:
        codes = [child.poll() for child in children]
        killed = next((rank for rank, code in enumerate(codes, start=1) if code is not None and code < 0), None)
        if killed is not None:
            return f"process {killed} of the run {ended_by(signal.Signals(-codes[killed - 1]).name)}"
        if None not in codes:  # all of them gone, none by a signal
            break
        time.sleep(0.05)
    return "another process of the run stopped (its own message says why)"


# what gloo says in the other processes when one process of a multi-process run has ended
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def lost_another_process(err: BaseException) -> bool:
    """Whether a fit failed in a collective because another process of the run had ended (its
    error, a full disk say, is said by that process). The second process of a two-process run
    whose first process met a full disk printed gloo's traceback of 79 lines after the one-line
    error: "Connection closed by peer ... This is typically caused by a remote worker crashing"."""
    if not isinstance(err, RuntimeError):
        return False
    dist_error = getattr(torch.distributed, "DistError", ())  # raised by NCCL's and the stores' failures
    return isinstance(err, dist_error) or any(words in str(err) for words in _PEER_GONE)


def requeued(cfg: DictConfig) -> str:
    """After SLURM's requeue signal stopped a fit: requeue the job where its command, started
    again, goes on with this run (``slurm.requeue``), and say what was done."""
    stopped = "stopped by SLURM's requeue signal (SIGUSR1)"
    hint = resume_hint(cfg.stage, cfg.run_dir)
    if not continues_when_restarted(cfg):
        return (
            f"{stopped}; the job was not requeued, since its command would start another run when started again "
            f"(with run_dir=DIR and --auto-resume it goes on with its run): {hint}"
        )
    job, failure = slurm.requeue()
    if failure:
        return f"{stopped}; the job could not be requeued: {failure}: {hint}"
    goes_on = "starts it again (no epoch of it had finished)"
    if resume_target(cfg.run_dir)[1].exists():
        goes_on = "goes on with it from its last finished epoch"
    return f"{stopped} and requeued job {job}: when the job starts again, its command {goes_on} ({cfg.run_dir})"


def memory_advice(trainer: pl.Trainer, cfg: DictConfig) -> str:
    """What to lower after running out of GPU memory in a fit (the batch size of the loop it ran
    out in, or the precision), and how to go on with the run."""
    stopped_in = next((c.stopped_in for c in trainer.callbacks if isinstance(c, ResumeHint)), None)
    validating = stopped_in in (RunningStage.VALIDATING, RunningStage.SANITY_CHECKING)
    key = "data.eval_batch_size" if validating else "data.batch_size"
    bf16 = "" if "bf16" in str(cfg.trainer.precision) else ", or train in bfloat16 (trainer.precision=bf16-mixed)"
    return f"lower {key} (now {OmegaConf.select(cfg, key)}){bf16}; {resume_hint(cfg.stage, cfg.run_dir)}"


def resumed_epoch(ckpt_path: str | Path) -> int:
    """The epoch a fit resumed from this checkpoint starts in, as Lightning's fit loop counts it
    (the epochs it has processed): the next one after an epoch's end, the same one after a
    checkpoint written within it."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    progress = ckpt.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    return int(progress.get("processed", ckpt.get("epoch", 0)))


# what this process was told during its fit: a SIGTERM (in a multi-process fit, where StopAtStep
# acts on it), SLURM's requeue signal
_STOP = {"sigterm": False, "requeue": False}


def _note_sigterm(signum, frame) -> None:
    """The SIGTERM handler of a multi-process fit: it only takes note (``StopAtStep`` acts on it)."""
    _STOP["sigterm"] = True


def _stop_for_requeue(trainer: pl.Trainer) -> None:
    """SLURM's requeue signal: the fit stops as after a SIGTERM (a multi-process fit at the step
    ``StopAtStep`` agrees on), and ``fit`` requeues the job."""
    _STOP["requeue"] = True
    if trainer.world_size <= 1:
        trainer._signal_connector.received_sigterm = True  # Lightning stops after the current step


class StopAtStep(pl.Callback):
    """A SIGTERM in a multi-process fit (DDP) stops every process at the same training step.

    Lightning's own handler broadcasts from inside the signal handler, wherever the process is:
    when the others are in another collective at that moment (validation's metric sync, say),
    every process may wait forever (seen once, two CPU processes, a SIGTERM during validation).
    And a process that has the SIGTERM stops at the end of its step alone, so the others wait for
    it in their next collective. Here the handler only takes note, and at the start of each
    training step the processes agree (one all-reduce of one value) whether any of them has one:
    then all of them stop at the end of that step. Not at the epoch's last step, which its
    validation and checkpoint follow: they stop a step into the next epoch, with that epoch kept.
    A single-process fit keeps Lightning's handling, which stops it after the current step."""

    def __init__(self, trainer: pl.Trainer):
        if trainer.world_size > 1:  # read by Lightning when the fit registers its handlers
            trainer._signal_connector._sigterm_notifier_fn = _note_sigterm

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if trainer.world_size <= 1 or not torch.distributed.is_initialized():
            return
        if batch_idx + 1 >= trainer.num_training_batches > 1:  # the same step in every process
            return
        received = torch.tensor([float(_STOP["sigterm"]), float(_STOP["requeue"])], device=trainer.strategy.root_device)
        torch.distributed.all_reduce(received, op=torch.distributed.ReduceOp.MAX)
        sigterm, requeue = received.tolist()
        if sigterm or requeue:
            _STOP["requeue"] = bool(requeue)  # each process says why it stopped alike
            if started_by_spawn(trainer):
                # Lightning's stop, a SystemExit without a code, would end this process with exit
                # code 0 and no result, and the command would wait for its result forever
                release_process_group_at_exit()  # every process stops here: no collective follows
                raise Terminated("SIGTERM")
            trainer._signal_connector.received_sigterm = True


def started_by_spawn(trainer: pl.Trainer) -> bool:
    """Whether the fit runs in processes that the command started (``trainer.strategy=ddp_spawn``)."""
    from pytorch_lightning.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    return isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher)


@contextmanager
def passing_sigterm_on(trainer: pl.Trainer) -> Iterator[None]:
    """With ``trainer.strategy=ddp_spawn`` the command's own process only waits for the processes
    it started, and a SIGTERM (a scheduler's time limit) ended it at once, without a word, while
    they went on or stopped alone. Here it passes the signal on to them instead (a second
    one, where they had it too, changes nothing): they stop at the same step (``StopAtStep``), and
    ``fit`` says how to resume."""
    if not started_by_spawn(trainer) or threading.current_thread() is not threading.main_thread():
        yield
        return

    def pass_on(signum, frame) -> None:
        for child in multiprocessing.active_children():
            with suppress(ProcessLookupError):  # it ended meanwhile
                os.kill(child.pid, signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, pass_on)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class EarlyStop(EarlyStopping):
    """Lightning's early stopping (``early_stop_patience``), which says when it stopped a run.
    A resumed run goes on counting the validation rounds without improvement, with the patience
    its command gives (Lightning's would take the checkpoint's, so ``--resume RUN
    early_stop_patience=10`` could not let an early-stopped run go on)."""

    def load_state_dict(self, state_dict: dict) -> None:
        patience = self.patience
        super().load_state_dict(state_dict)
        self.patience, self.stopped_epoch = patience, 0  # this fit has not stopped yet

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stopped_epoch and trainer.is_global_zero:
            print(
                f"early stop: {self.monitor} has not improved for {self.patience} validation rounds "
                f"(best {float(self.best_score):.4f}); stopped after epoch {self.stopped_epoch}"
            )


class DivergenceStop(pl.Callback):
    """Ends a fit at the end of the epoch whose mean training loss is not finite (a learning rate
    too high for the data, say): every later epoch would train on NaN weights. Reads the epoch's
    loss, which is logged anyway, once per epoch (no step waits for the device). ``epoch`` and
    ``value`` say where it stopped (``divergence`` finds it, ``fail_diverged`` says it)."""

    def __init__(self):
        self.epoch: int | None = None
        self.value = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loss = trainer.callback_metrics.get("train/epoch_loss")
        if loss is not None and not bool(torch.isfinite(loss)):
            self.epoch, self.value = trainer.current_epoch, float(loss)
            trainer.should_stop = True


class RandomState(pl.Callback):
    """A run resumed from its ``last.ckpt`` goes on with the random state that the same run never
    stopped has there, so it trains the same: the same drop-path and MAE masks (the training order
    is the seed's and the epoch's alone, ``EpochSampler``). Lightning's checkpoints do not hold
    it, and a resumed process has drawn other numbers by the time it trains (its sanity check,
    its model's initialisation).

    Each process's torch random state (the CPU's and its GPU's) is kept at the end of every
    training epoch, when ``last.ckpt`` is written, all processes' in every checkpoint; a resumed
    fit sets it back as its first epoch starts. Only where the checkpoint was written at that
    point (a checkpoint written in the middle of an epoch resumes as before), and only with the
    same number of processes."""

    def __init__(self):
        self.kept: dict | None = None  # {"global_step": int, "ranks": [{"cpu": ByteTensor, "cuda": ...}]}
        self.loaded: dict | None = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = {"cpu": torch.get_rng_state()}
        if pl_module.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(pl_module.device)
        ranks = [state]
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [None] * trainer.world_size  # every process gets here at every epoch's end
            torch.distributed.all_gather_object(ranks, state)
        self.kept = {"global_step": trainer.global_step, "ranks": ranks}

    def state_dict(self) -> dict:
        return dict(self.kept) if self.kept else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self.loaded = state_dict or None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loaded, self.loaded = self.loaded, None
        if not loaded or loaded["global_step"] != trainer.global_step:
            return
        if len(loaded["ranks"]) != trainer.world_size:
            if trainer.is_global_zero:
                say(
                    f"note: the checkpoint holds the random state of {len(loaded['ranks'])} processes and this "
                    f"fit has {trainer.world_size}: it goes on with fresh random draws (drop-path, masks), "
                    "so it does not repeat the run's uninterrupted course"
                )
            return
        state = loaded["ranks"][trainer.global_rank]
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and pl_module.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], pl_module.device)


class ReleaseProcessGroup(pl.Callback):
    """A process of a multi-process run that finished its fit (or validation) destroys its
    process group as it exits. Lightning leaves the group to the interpreter's shutdown, where
    gloo's threads were sometimes torn down still running: "terminate called without an active
    exception", and the process ended with SIGABRT after its work was done (with ddp_spawn the
    whole command then failed; about 1 run in 15 of a two-process CPU validation here). At exit,
    not at teardown: the first process of a run goes on after its fit (the run's report), and a
    Trainer can fit or validate again. Not after a failed fit, whose other processes may never
    come back to the group (Lightning calls the teardown hooks of a fit or validation that
    finished, not of one that raised)."""

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            release_process_group_at_exit()


def release_process_group_at_exit() -> None:
    """Have ``release_process_group`` run as this process exits, once however often this is called
    (a process may run several fits)."""
    atexit.unregister(release_process_group)
    atexit.register(release_process_group)


def release_process_group() -> None:
    """Destroy this process's default process group, if it has one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def divergence(trainer: pl.Trainer) -> DivergenceStop | None:
    """The ``DivergenceStop`` that ended this trainer's fit, or None."""
    stop = next((c for c in trainer.callbacks if isinstance(c, DivergenceStop)), None)
    return stop if stop is not None and stop.epoch is not None else None


def fail_diverged(stop: DivergenceStop, cfg: DictConfig, phase: str = "") -> NoReturn:
    """End the command of a diverged fit: one line in its first process, and exit code 1 in the
    others of a multi-GPU run too (they stopped alike, on the same synchronised loss). The line
    names the damaged files where the cache holds NaN or inf inputs, the settings to lower where
    it does not."""
    if launch_rank() > 0:
        raise SystemExit(1)
    from forecast_peft.data.cache import damage_line

    said = f"{phase}training diverged: train/epoch_loss was {stop.value} in epoch {stop.epoch}"
    print(f"{said}: checking the cache at {cfg.data.cache_dir} for damaged values", flush=True)
    damage = damage_line(cfg.data.cache_dir, ("train", "val"))
    if damage:  # not the learning rate: no setting trains on NaN inputs
        raise UserError(f"{said}, and {damage}, then run again in a new run directory")
    raise UserError(
        f"{said}, so the run stopped "
        "there (its last.ckpt holds the diverged weights; a best checkpoint, if any, is from before): run it again "
        f"with a lower optim.lr (now {cfg.optim.lr:g}) or trainer.gradient_clip_val (now "
        f"{OmegaConf.select(cfg, 'trainer.gradient_clip_val')}), in a new run directory"
    )


def warn_of_settings(cfg: DictConfig) -> None:
    """Say, before a run starts, where its settings work against it without being wrong.

    - bf16-true keeps the weights themselves in bfloat16, 8 significant bits: an AdamW update below
      about 1/256 of its weight rounds away, and more of them do as the learning rate decays
      (measured in README.md: the validation error falls more slowly than in 32-true and
      bf16-mixed once the rate has decayed).
    - A warm-up as long as the run (the default 10 epochs with a shortened ``trainer.max_epochs``):
      the schedule then raises the learning rate over every step and never decays it."""
    if str(OmegaConf.select(cfg, "trainer.precision")) == "bf16-true":
        say(
            "warning: trainer.precision=bf16-true keeps the weights in bfloat16 (8 significant bits): updates "
            "under about 1/256 of a weight are lost, so training stalls as the learning rate decays; bf16-mixed "
            "computes in bfloat16 and keeps float32 weights",
            file=sys.stderr,
        )
    warmup, epochs = OmegaConf.select(cfg, "optim.warmup_epochs"), OmegaConf.select(cfg, "trainer.max_epochs")
    if warmup is not None and isinstance(epochs, int) and 1 < epochs <= warmup:
        say(
            f"note: optim.warmup_epochs={warmup:g} is not below trainer.max_epochs={epochs}: the learning rate "
            "rises over the whole run and never decays towards optim.min_lr (the published recipe warms up for 10 "
            "of 60 epochs); a shorter run wants a shorter warm-up, such as optim.warmup_epochs=1",
            file=sys.stderr,
        )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written whole or not at all, on any file system. Lightning's own writing goes
    through an fsspec transaction whose temporary file lies in the system's temporary folder;
    where that is another file system than the run's (a local /tmp beside a network or data disk),
    the last step copies it over the checkpoint in place, so a disk that fills then leaves the
    checkpoint cut short: a damaged ``last.ckpt``, and the run could not be resumed. Here the
    checkpoint is written beside its final name and renamed onto it once complete; a write that
    fails removes its partial file, leaves the checkpoint before it as it was, and names it."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = io.BytesIO()
        torch.save(checkpoint, data)  # serialised first, so a failed write is always an OSError
        # the view released here, not by the garbage collector: a failed write's traceback holds it
        # in a reference cycle with the BytesIO, whose collection crashes Python 3.12.0 and 3.12.1
        # (CPython gh-111049; seen here on 3.12.1 as a segmentation fault)
        with data.getbuffer() as view:
            write_bytes_atomic(path, view)

    def remove_checkpoint(self, path) -> None:
        """Lightning's removal, and with ``trainer.strategy=ddp_spawn`` the folder of the weights
        that the first process hands to the command's own at the end of a fit: Lightning writes
        them to ``.temp.ckpt`` in a new folder of the system's temporary folder
        (``tempfile.mkdtemp``) and removes the file but not the folder, so each such fit left an
        empty ``tmp*`` folder there. Only an empty folder is removed."""
        super().remove_checkpoint(path)
        path = Path(path)
        if path.name == ".temp.ckpt" and path.parent.name.startswith("tmp"):
            with suppress(OSError):  # not empty: not only Lightning's
                path.parent.rmdir()


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, which follows its run directory when the run is moved (copied
    to another machine, renamed) and resumed there. Lightning's own keeps its record of the best
    checkpoints only where the checkpoint's folder is the one it was written in: elsewhere it
    forgot the best score, took the next epoch for the best whatever its value, and left the
    earlier best file beside it. Here the record's checkpoints in the run's old folder are read as
    the same files in the new one; those that did not come along are forgotten, as Lightning
    forgot them all, so that a later epoch writes a best checkpoint the run has."""

    def _generate_state_key(self, **kwargs) -> str:
        # Lightning's own class name: a checkpoint keeps its callbacks' state under it, so runs
        # checkpointed before this class was used resume with their record too
        return f"{ModelCheckpoint.__qualname__}{kwargs!r}"

    def load_state_dict(self, state_dict: dict) -> None:
        old = state_dict.get("dirpath")
        if old is not None and self.dirpath is not None and old != self.dirpath:
            state_dict = self._moved_state(state_dict)
        super().load_state_dict(state_dict)

    def _moved_state(self, state: dict) -> dict:
        """``state`` (saved in another folder) read in this one: the best checkpoints found here
        under their file names, with their scores; the best and the k-th best among them."""
        old = Path(state["dirpath"])

        def here(path: str) -> str:
            return str(Path(self.dirpath) / Path(path).name) if path and Path(path).parent == old else path

        kept = {here(path): score for path, score in (state.get("best_k_models") or {}).items()}
        kept = {path: score for path, score in kept.items() if Path(path).is_file()}
        state = {**state, "dirpath": self.dirpath, "best_k_models": kept}
        state["last_model_path"] = here(state.get("last_model_path", ""))
        if kept:
            ranked = sorted(kept, key=lambda path: float(kept[path]), reverse=self.mode == "max")
            state.update(best_model_path=ranked[0], best_model_score=kept[ranked[0]])
            state.update(kth_best_model_path=ranked[-1], kth_value=kept[ranked[-1]])
        else:  # no best checkpoint came along (or none is monitored): none is known
            state.update(best_model_path="", best_model_score=None, kth_best_model_path="", kth_value=self.kth_value)
        return state


def make_trainer(
    cfg: DictConfig, run_dir: Path, monitor: str, max_epochs: int | None = None, resume: str | None = None
) -> tuple[pl.Trainer, ModelCheckpoint]:
    """A Trainer from ``cfg.trainer`` (any Lightning argument) with CSV logs (and TensorBoard's
    with ``tensorboard=true``), last and best
    checkpoints (by ``monitor``, lower is better) under ``run_dir``; ``resume``: the checkpoint
    the run continues from, whose logged history the logs keep."""
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    if max_epochs is not None:
        kwargs["max_epochs"] = max_epochs
    checkpoint = RunCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best-epoch{epoch:03d}",
        auto_insert_metric_name=False,
        monitor=monitor,
        mode="min",
        save_top_k=1,
        # a run directory is the run's own: a checkpoint is overwritten, also in a run that was
        # moved and resumed (Lightning would otherwise write last-v1.ckpt beside last.ckpt, and the
        # next --resume would find the older one)
        enable_version_counter=False,
    )
    # last.ckpt, every epoch's end: what --resume goes on from and eval's unbiased choice. Not
    # ModelCheckpoint's save_last, which since Lightning 2.6 writes it only when a best checkpoint
    # is written at the same step (so with save_top_k=1 it was the best epoch's).
    last = RunCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="last",
        monitor=None,
        save_top_k=1,
        save_on_train_epoch_end=True,
        enable_version_counter=False,
    )
    callbacks = [
        checkpoint,  # the first: trainer.checkpoint_callback, whose best finish_run reports
        last,
        LearningRateMonitor(logging_interval="step"),
        ResumeHint(cfg.stage, cfg.run_dir),
        DivergenceStop(),
        RandomState(),
        ReleaseProcessGroup(),
        RecordEnvironment(run_dir),
    ]
    if cfg.get("early_stop_patience"):
        callbacks.append(EarlyStop(monitor=monitor, mode="min", patience=int(cfg.early_stop_patience)))
    if kwargs.get("enable_progress_bar", True):  # a bar on a terminal, lines into a log file or a pipe
        callbacks.append(StepProgressBar() if on_terminal(sys.stdout) else TrainingLines())
    plugins = list(kwargs.pop("plugins", None) or [])  # a list (the checks refuse anything else)
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    cluster = slurm.cluster_plugin()  # SLURM's requeue signal handled by fpeft (forecast_peft.slurm)
    if cluster is not None and not any(isinstance(p, ClusterEnvironment) for p in plugins):
        plugins.append(cluster)
    kept = NOTHING_KEPT if resume is None else _checkpoint_position(resume)
    loggers = [RunLogger(run_dir, kept)]
    if cfg.get("tensorboard"):
        loggers.append(tensorboard_logger(run_dir, kept))
    trainer = lightning_trainer(
        logger=loggers,
        callbacks=callbacks,
        plugins=plugins,
        default_root_dir=str(run_dir),
        **{"enable_model_summary": False, **kwargs},
    )
    trainer.callbacks.append(StopAtStep(trainer))
    return trainer, checkpoint


def container(node) -> dict:
    return OmegaConf.to_container(node, resolve=True)


def finish_run(result: dict, trainer: pl.Trainer, cfg: DictConfig, next_step: str) -> None:
    """Mark a run whose fit ended (all its epochs, an early stop, or its divergence; an interrupted
    run exits before) with ``RUN/finished.json``, and say its run directory, the best monitored
    value with its checkpoint, the last checkpoint, and the command that goes on from there. A
    diverged run (``DivergenceStop``) is recorded as such, and its command then fails in one line."""
    run_dir = Path(result["run_dir"])
    callback = trainer.checkpoint_callback
    score = callback.best_model_score  # None where no validation ran, or in a spawned process's parent
    best = None if score is None or not bool(torch.isfinite(score)) else float(score)  # strict JSON
    stop = divergence(trainer)
    if launch_rank() == 0:
        record = {**result, "monitor": callback.monitor, "best_value": best}
        if stop is not None:
            record["diverged_epoch"] = stop.epoch
        (run_dir / FINISHED_FILE).write_text(json.dumps(record, indent=1))
    best_ckpt, last_ckpt = (run_dir / "checkpoints" / Path(result[key]).name for key in ("best", "last"))
    lines = [f"run: {run_dir}"]
    if not result["last"]:
        lines.append("  no checkpoint written: no epoch was trained")
    else:
        if best is not None:
            lines.append(f"  best {callback.monitor} {best:.4f}: {best_ckpt}")
        lines.append(f"  last: {last_ckpt}")
        if stop is None:
            lines.append(f"  next: {next_step}")
    say("\n".join(lines))
    if stop is None and score is not None and best is None and launch_rank() == 0:
        _say_nonfinite_validation(callback.monitor, cfg)
    release_run_dir(run_dir)
    if stop is not None:
        fail_diverged(stop, cfg)


def _say_nonfinite_validation(monitor: str, cfg: DictConfig) -> None:
    """Every validation round of a fit that did not diverge gave NaN or inf (Lightning ranks those
    as inf, so its 'best' checkpoint was chosen on nothing): say so, and whether the validation
    split's cache holds NaN or inf inputs (``damage_line``)."""
    from forecast_peft.data.cache import damage_line

    print(
        f"warning: {monitor} was NaN or inf in every validation round, so the best checkpoint was not chosen on it",
        file=sys.stderr,
    )
    damage = damage_line(cfg.data.cache_dir, ("val",))
    cause = damage or (
        "the validation cache holds finite values only, so the model forecast NaN or inf on validation "
        "scenarios (`fpeft eval` names them)"
    )
    print(f"warning: {cause}", file=sys.stderr)


def checkpoint_paths(callback: ModelCheckpoint, run_dir: Path) -> dict[str, str]:
    """Best and last checkpoint of a finished fit, as absolute paths (as Lightning keeps them).
    last.ckpt, and under spawn-based strategies (where the callback in this process never saw the
    paths) the best too, are found on disk."""
    ckpt_dir = Path(run_dir).resolve() / "checkpoints"
    last = callback.last_model_path or (str(ckpt_dir / "last.ckpt") if (ckpt_dir / "last.ckpt").exists() else "")
    best = callback.best_model_path or next((str(p) for p in sorted(ckpt_dir.glob("best-*.ckpt"))[-1:]), "") or last
    return {"best": best, "last": last}
