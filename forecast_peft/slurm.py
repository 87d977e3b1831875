"""SLURM's requeue signal in a training run.

A job submitted with ``--signal=USR1@90`` (and ``--requeue``) gets SIGUSR1 that many seconds
before its time limit, so that it can save its state and put itself back in the queue.
Lightning's own handling of it, left as it was, broke an fpeft run: it wrote a mid-epoch
``hpc_ckpt_N.ckpt`` from inside the signal handler, which ``--resume`` does not read; SLURM signals
every process of the step, so the DataLoader workers (which inherit the handler, or die of the
signal's default action) saved checkpoints and requeued the job as well, or ended the run with
"DataLoader worker is killed by signal: User defined signal 1"; and the requeued job ran its
command again, which started a new run from the first epoch (or was refused, with ``run_dir=``
holding a run).

Here the signal stops the run as a SIGTERM does (after the current step, every process at the
same step; the checkpoint of the last finished epoch is kept), DataLoader workers ignore it, and
the first process requeues the job with ``scontrol requeue`` where the same command, started
again, goes on with the run (``--auto-resume``, ``--resume``, a sweep in a named folder). The
command then ends with exit code 143 and one line that says what was done."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Callable
from contextlib import contextmanager

from forecast_peft.errors import ConfigError
from forecast_peft.runtime import env_count

REQUEUE_SIGNAL = getattr(signal, "SIGUSR1", None)  # what SLURM's --signal=USR1@N sends; none on Windows


def on_slurm() -> bool:
    """Whether Lightning takes this process for a task of a SLURM job (``SLURM_NTASKS`` set, and
    not an interactive allocation, whose ``SLURM_JOB_NAME`` is bash or interactive)."""
    from pytorch_lightning.plugins.environments import SLURMEnvironment

    return SLURMEnvironment.detect()


def check_job_step(uses_gpus: bool = False) -> None:
    """Refuse, in a line, a SLURM job step whose tasks Lightning cannot place (its own check raised
    a RuntimeError, with a traceback): more than one task without ``--ntasks-per-node``, from
    which each process takes its device; and, for a fit on GPUs (``uses_gpus``), tasks that each
    see only some of their node's GPUs (``--gpus-per-task``, ``--gpu-bind``), where Lightning's
    process N of a node takes the node's GPU N (its own check: "You requested gpu: [0, 1, 2, 3]
    But your machine only has: [0]", Lightning issue 16828). Nothing off SLURM."""
    if not on_slurm():
        return
    tasks = env_count("SLURM_NTASKS") or 1
    if tasks > 1 and "SLURM_NTASKS_PER_NODE" not in os.environ:
        raise ConfigError(
            f"this SLURM job has {tasks} tasks (--ntasks={tasks}) but no --ntasks-per-node, from which Lightning "
            "gives each process its device: submit it with --nodes=M --ntasks-per-node=N (N: trainer.devices, "
            "M: trainer.num_nodes) and start fpeft with srun"
        )
    per_node = env_count("SLURM_NTASKS_PER_NODE") or 1
    if not uses_gpus or per_node < 2:
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    seen = None if visible is None else len([d for d in visible.split(",") if d.strip()])
    if "SLURM_GPUS_PER_TASK" in os.environ:
        given = f"its own GPUs (--gpus-per-task={os.environ['SLURM_GPUS_PER_TASK']})"
    elif seen is not None and seen < per_node:
        given = f"{seen} of the node's GPUs (CUDA_VISIBLE_DEVICES={visible}; --gpu-bind, say)"
    else:
        return
    raise ConfigError(
        f"this SLURM job step gives each of its {per_node} tasks per node {given}, and Lightning needs every "
        "process of a node to see all of the node's GPUs (its process N takes GPU N): submit the job with "
        f"--gpus-per-node={per_node} (or --gres=gpu:{per_node}) and --ntasks-per-node={per_node}, without "
        "--gpus-per-task or --gpu-bind"
    )


def job_step() -> tuple[int, int | None, int | None] | None:
    """This SLURM job step's tasks in all, per node and its nodes (None where SLURM does not say),
    as Lightning reads them; None off SLURM."""
    if not on_slurm():
        return None
    return env_count("SLURM_NTASKS") or 1, env_count("SLURM_NTASKS_PER_NODE"), env_count("SLURM_NNODES")


def cluster_plugin():
    """Lightning's SLURM environment without its own requeue handling (see the module), for a
    Trainer on SLURM; None elsewhere."""
    if not on_slurm():
        return None
    from pytorch_lightning.plugins.environments import SLURMEnvironment

    return SLURMEnvironment(auto_requeue=False)


def ignore_requeue_signal(worker_id: int | None = None) -> None:
    """A DataLoader worker's ``worker_init_fn``: the requeue signal is for the main process, which
    stops the run; a worker would otherwise die of it, or run the handler it inherited."""
    if REQUEUE_SIGNAL is not None:
        signal.signal(REQUEUE_SIGNAL, signal.SIG_IGN)


@contextmanager
def requeue_signal_blocked():
    """Processes started within the block never see the requeue signal: this thread holds it
    back meanwhile (one that comes is delivered at the end of the block) and a started process
    inherits it held back. For the helper processes of ``multiprocessing`` (its fork server and
    resource tracker, a pool's workers): SLURM signals every process of the job step, and they
    died of the signal's default action (the resource tracker's death printed tracebacks; the
    fork server's made the DataLoader take each worker it had started for dead)."""
    if REQUEUE_SIGNAL is None or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {REQUEUE_SIGNAL})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextmanager
def requeue_signal_calls(handler: Callable[[], None]):
    """Within the block, SLURM's requeue signal calls ``handler`` (in this process only, not in a
    forked child); outside SLURM, or off the main thread, nothing changes."""
    if REQUEUE_SIGNAL is None or not on_slurm() or threading.current_thread() is not threading.main_thread():
        yield
        return
    owner = os.getpid()

    def on_signal(signum, frame) -> None:
        if os.getpid() == owner:
            handler()

    previous = signal.signal(REQUEUE_SIGNAL, on_signal)
    try:
        yield
    finally:
        signal.signal(REQUEUE_SIGNAL, previous)


def job_id() -> str | None:
    """The job to requeue: an array task as ``<array job>_<task>``, as scontrol names it."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def requeue() -> tuple[str | None, str | None]:
    """``scontrol requeue`` this job: (the job, None) where it worked, (the job, why not) where not."""
    job = job_id()
    if not job:
        return None, "no SLURM_JOB_ID in the environment"
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        return job, "scontrol is not on PATH"
    except (OSError, subprocess.TimeoutExpired) as err:
        return job, f"`scontrol requeue {job}`: {err}"
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        return job, f"`scontrol requeue {job}` failed ({said[-1] if said else f'exit code {done.returncode}'})"
    return job, None
