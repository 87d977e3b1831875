"""Restarted batch jobs: ``--auto-resume``, and SLURM's requeue signal (``forecast_peft.slurm``)."""

import os
import signal
import subprocess
import sys

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from forecast_peft import config
from forecast_peft.cli import main
from forecast_peft.config import RUN_DIR_ENV
from forecast_peft.errors import ConfigError
from tests.conftest import TINY
from tests.trainer_hooks import run_in_own_session

# A task of a one-task SLURM job, as srun starts it
SLURM_TASK = {
    "SLURM_NTASKS": "1",
    "SLURM_JOB_NAME": "train",
    "SLURM_JOB_ID": "42",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
}

_REQUEUE_SIGNAL_IN_THE_SECOND_EPOCH = """
import os, signal, sys
import pytorch_lightning as pl
from forecast_peft.cli import main
from tests.trainer_hooks import add_callback

class RequeueSignal(pl.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.current_epoch == 1:  # SLURM signals every process of the job step, workers too
            os.killpg(os.getpgid(0), signal.SIGUSR1)

if __name__ == "__main__":  # forkserver runs this file again in each DataLoader worker
    add_callback(RequeueSignal)
    sys.exit(main(sys.argv[1:]))
"""


def _fake_scontrol(folder, exit_code: int = 0):
    """An ``scontrol`` that writes its arguments to ``folder/scontrol.log`` (and fails with
    ``exit_code``); returns the log's path."""
    log = folder / "scontrol.log"
    script = folder / "scontrol"
    fail = f"echo 'scontrol: error: Invalid job id specified' >&2; exit {exit_code}" if exit_code else ""
    script.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\n{fail}\n')
    script.chmod(0o755)
    return log


def test_the_requeue_signal_stops_the_run_requeues_the_job_and_the_same_command_goes_on(
    synth_root, tmp_path, monkeypatch, capsys
):
    """SLURM's requeue signal (``--signal=USR1@90``) to every process of the job step in the
    second epoch: the run stops after the step with its first epoch's checkpoint, the job is
    requeued once, and the command ends with 143 and one line. Lightning's own handling ended it
    with a DataLoader worker's traceback ("killed by signal: User defined signal 1"), requeued the
    job twice (a forked worker ran its handler too) and left a mid-epoch hpc_ckpt_1.ckpt that
    --resume does not read. The same command, started again as the requeued job does, goes on
    from that epoch and finishes the run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = _fake_scontrol(bin_dir)
    script = tmp_path / "fpeft_requeue.py"
    script.write_text(_REQUEUE_SIGNAL_IN_THE_SECOND_EPOCH)
    run = tmp_path / "run"
    args = ["pretrain", "--auto-resume", *TINY, f"data.root={synth_root}", "trainer.max_epochs=3", f"run_dir={run}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", RUN_DIR_ENV)}
    env.update(SLURM_TASK, PATH=f"{bin_dir}{os.pathsep}{env['PATH']}")
    command = [sys.executable, str(script), *args, "data.num_workers=1"]
    code, err = run_in_own_session(command, env, "the run did not stop within 240 s")  # its own process group
    assert code == 143, err[-2000:]
    assert "Traceback" not in err
    expected = (
        "fpeft: stopped by SLURM's requeue signal (SIGUSR1) and requeued job 42: when the job starts again, its "
        f"command goes on with it from its last finished epoch ({run})"
    )
    assert err.count(expected) == 1, err[-2000:]
    assert log.read_text() == "requeue 42\n"
    assert not list(run.glob("hpc_ckpt*"))
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 0

    for key, value in SLURM_TASK.items():  # the requeued job: the same command
        monkeypatch.setenv(key, value)
    assert main([*args, "data.num_workers=0"]) == 0
    assert f"resuming from {run / 'checkpoints' / 'last.ckpt'}" in capsys.readouterr().out
    assert sorted(pd.read_csv(run / "logs" / "metrics.csv")["epoch"].dropna().unique()) == [0, 1, 2]
    assert (run / "finished.json").is_file()


def _stopped_run(tmp_path, **values):
    cfg = {"stage": "pretrain", "run_dir": str(tmp_path / "run"), "resume": None, "auto_resume": False, **values}
    return OmegaConf.create(cfg)


def test_a_command_that_would_start_another_run_does_not_requeue_its_job(tmp_path, monkeypatch):
    """Without --auto-resume (or --resume, or a sweep in a named folder) the requeued job would
    train another run from its first epoch: the job is not requeued, and the line says why."""
    from forecast_peft.training import requeued

    log = _fake_scontrol(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    line = requeued(_stopped_run(tmp_path))
    assert line.startswith("stopped by SLURM's requeue signal (SIGUSR1); the job was not requeued")
    assert "--auto-resume" in line and not log.exists()
    assert "requeued job 42" in requeued(_stopped_run(tmp_path, resume=str(tmp_path / "run")))
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "7")  # a task of an array job is requeued by its own name
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert "requeued job 7_3" in requeued(_stopped_run(tmp_path, auto_resume=True))
    assert log.read_text() == "requeue 42\nrequeue 7_3\n"


def test_a_requeue_that_fails_says_why_and_how_to_resume(tmp_path, monkeypatch):
    from forecast_peft.training import requeued

    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol
    stopped = _stopped_run(tmp_path, auto_resume=True)
    assert requeued(stopped) == (
        "stopped by SLURM's requeue signal (SIGUSR1); the job could not be requeued: scontrol is not on PATH: "
        "no epoch of it had finished, so there is nothing to resume: run it again"
    )
    _fake_scontrol(tmp_path, exit_code=1)
    assert "`scontrol requeue 42` failed (scontrol: error: Invalid job id specified)" in requeued(stopped)


def test_auto_resume_needs_a_named_run_dir(tmp_path):
    with pytest.raises(ConfigError, match="--auto-resume needs run_dir=DIR, the same at every start of the job"):
        config.compose("pretrain", ["auto_resume=true"])
    cfg = config.compose("pretrain", ["auto_resume=true", f"run_dir={tmp_path / 'new'}"])
    assert cfg.resume is None  # nothing there yet: it starts the run


def _in_job_step(monkeypatch, tasks: dict[str, str]) -> None:
    """This process as the first task of a SLURM job step with ``tasks`` (SLURM's variables)."""
    for key, value in {**SLURM_TASK, **tasks}.items():
        monkeypatch.setenv(key, value)
    for key in {"SLURM_NTASKS_PER_NODE", "SLURM_NNODES"} - set(tasks):
        monkeypatch.delenv(key, raising=False)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)


@pytest.mark.parametrize(
    "tasks, trainer_args, refusal",
    [
        # one task, two devices: Lightning trained one process on one device, without a word
        (
            {"SLURM_NTASKS": "1"},
            ["trainer.devices=2", "trainer.strategy=ddp"],
            "trainer.devices=2 on trainer.num_nodes=1 makes 2 processes, but this SLURM job step has 1 task: "
            "submit the job with --nodes=1 --ntasks-per-node=2 and start fpeft with srun, or set trainer.devices=1",
        ),
        # ddp_spawn: every started process took SLURM's rank 0 and trained alone, into one run directory
        (
            {"SLURM_NTASKS": "1"},
            ["trainer.devices=2", "trainer.strategy=ddp_spawn"],
            "trainer.strategy=ddp_spawn starts its processes itself, which this SLURM job step cannot use",
        ),
        # Lightning's ValueError at the fit's start, a traceback
        (
            {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1"},
            ["trainer.devices=2"],
            "makes 2 processes, but this SLURM job step has 1 task per node (--ntasks-per-node=1)",
        ),
        (
            {"SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "2"},
            ["trainer.devices=2"],
            "but this SLURM job step has 2 nodes (--nodes=2): set trainer.num_nodes=2",
        ),
        # Lightning's RuntimeError when the Trainer is made, a traceback
        (
            {"SLURM_NTASKS": "2"},
            ["trainer.devices=2"],
            "this SLURM job has 2 tasks (--ntasks=2) but no --ntasks-per-node",
        ),
        # srun started two copies of a one-device run
        (
            {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2"},
            [],
            "trainer.devices=1 on trainer.num_nodes=1 makes 1 process, but this SLURM job step has 2 tasks per node",
        ),
    ],
)
def test_a_fit_that_does_not_match_its_slurm_job_step_is_refused_in_a_line(
    tasks, trainer_args, refusal, monkeypatch, capsys
):
    """Under SLURM Lightning takes every process to be a task that srun started. A fit asking for
    another number of processes than the job step has, or a strategy that starts its own, is
    refused before any work, in one line that says how to submit the job."""
    _in_job_step(monkeypatch, tasks)
    code = main(["pretrain", "--print-config", "trainer.accelerator=cpu", *trainer_args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert refusal in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "tasks, trainer_args",
    [
        ({"SLURM_NTASKS": "1"}, []),
        ({"SLURM_NTASKS": "1"}, ["trainer.strategy=ddp_spawn"]),  # one started process: SLURM's rank is right
        ({"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1"}, ["trainer.devices=2"]),
        (
            {"SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": "2"},
            ["trainer.devices=4", "trainer.num_nodes=2", "trainer.strategy=ddp"],
        ),
        # an interactive allocation: Lightning starts the processes itself, as off SLURM
        ({"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "bash"}, ["trainer.devices=2", "trainer.strategy=ddp_spawn"]),
    ],
)
def test_a_fit_that_matches_its_slurm_job_step_is_taken(tasks, trainer_args, monkeypatch, capsys):
    _in_job_step(monkeypatch, tasks)
    assert main(["pretrain", "--print-config", "trainer.accelerator=cpu", *trainer_args]) == 0, capsys.readouterr().err


FOUR_TASKS = {"SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": "1"}


@pytest.mark.parametrize(
    "gpus, given",
    [
        ({"SLURM_GPUS_PER_TASK": "1", "CUDA_VISIBLE_DEVICES": "0"}, "its own GPUs (--gpus-per-task=1)"),
        ({"CUDA_VISIBLE_DEVICES": "2,3"}, "2 of the node's GPUs (CUDA_VISIBLE_DEVICES=2,3; --gpu-bind, say)"),
    ],
)
def test_tasks_that_see_only_their_own_gpus_are_refused_in_one_line(gpus, given, monkeypatch, capsys):
    """SLURM's --gpus-per-task (or --gpu-bind) shows each task only its GPUs, and Lightning's
    process N of a node takes GPU N: its own check refused it with "You requested gpu: [0, 1, 2,
    3] But your machine only has: [0]" (Lightning issue 16828). fpeft says what to submit instead."""
    _in_job_step(monkeypatch, {**FOUR_TASKS, **gpus})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU node
    code = main(["pretrain", "--print-config", "trainer.devices=4"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"this SLURM job step gives each of its 4 tasks per node {given}, and Lightning needs every" in err
    assert "submit the job with --gpus-per-node=4 (or --gres=gpu:4) and --ntasks-per-node=4, without" in err


def test_tasks_that_see_every_gpu_of_their_node_or_fit_on_the_cpu_are_taken(monkeypatch):
    from forecast_peft import slurm

    _in_job_step(monkeypatch, {**FOUR_TASKS, "CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    slurm.check_job_step(uses_gpus=True)  # --gpus-per-node=4: every task sees all four
    monkeypatch.setenv("SLURM_GPUS_PER_TASK", "1")
    slurm.check_job_step(uses_gpus=False)  # a fit on the CPU takes no GPU
    _in_job_step(monkeypatch, {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "2"})
    slurm.check_job_step(uses_gpus=True)  # one task per node: its one GPU is GPU 0
    _in_job_step(monkeypatch, {**FOUR_TASKS, "SLURM_GPUS_PER_TASK": "1"})
    with pytest.raises(ConfigError, match="--gpus-per-task=1"):  # the same step on GPUs: refused
        slurm.check_job_step(uses_gpus=True)


def test_processes_started_with_the_requeue_signal_blocked_outlive_it():
    """multiprocessing's helper processes (its fork server and resource tracker, a pool's workers)
    are started with the requeue signal held back, which they inherit: SLURM signals every
    process of the job step, and one started as usual dies of it. This process's own signal mask
    is as before once the block ends."""
    from forecast_peft.slurm import REQUEUE_SIGNAL, requeue_signal_blocked

    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    plain = subprocess.Popen(sleeper)
    with requeue_signal_blocked():
        deaf = subprocess.Popen(sleeper)
        assert REQUEUE_SIGNAL in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert REQUEUE_SIGNAL not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    try:
        for child in (plain, deaf):
            os.kill(child.pid, REQUEUE_SIGNAL)
        assert plain.wait(timeout=30) == -REQUEUE_SIGNAL
        with pytest.raises(subprocess.TimeoutExpired):
            deaf.wait(timeout=2)
    finally:
        for child in (plain, deaf):
            child.kill()
            child.wait()
