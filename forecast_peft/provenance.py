"""Where a run's and a report's numbers came from: the software and the hardware that made them,
written beside them. A training run appends one line to ``RUN/environment.jsonl`` each time its
fit starts (the first start and every resume, which may be on another machine, with other
versions); ``fpeft eval`` writes ``OUT/environment.json`` beside its report; ``fpeft --version``
prints the same software. Lightning is not imported here (its version is read from the installed
package's metadata), so that ``fpeft --version`` answers in the time torch takes to import."""

from __future__ import annotations

import json
import platform
import shlex
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

from forecast_peft import __version__

ENVIRONMENT_LOG = "environment.jsonl"  # a run's: one line per start of its fit
ENVIRONMENT_FILE = "environment.json"  # an evaluation's, beside report.json
SOURCE_ROOT = Path(__file__).resolve().parents[1]  # the checkout, for an editable install
PACKAGES = ("pytorch-lightning", "numpy", "av2", "hydra-core")  # besides torch


def source_commit(root: Path = SOURCE_ROOT) -> str | None:
    """The git commit of the forecast_peft source this process runs, ``<sha>-dirty`` where tracked
    files differ from it; None where that source is not a git checkout (an installed package), or
    git cannot say (not installed, a repository it refuses to read)."""
    if not (root / ".git").exists():
        return None

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    if not sha:
        return None
    changes = git("status", "--porcelain", "--untracked-files=no")  # None where git could not say
    return sha + "-dirty" if changes else sha


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def software() -> dict:
    """Versions of forecast_peft (and its source commit), Python, torch (and the CUDA it was built
    for), the other packages that shape the numbers; the platform and the host."""
    found = {package: _version(package) for package in PACKAGES}
    return {
        "forecast_peft": __version__,
        "source_commit": source_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        **{package.replace("-", "_"): version for package, version in found.items()},
        "platform": platform.platform(),
        "host": socket.gethostname(),
    }


def processor() -> str:
    """The processor's model name and the instruction set torch uses on it, e.g. ``AMD EPYC
    (AVX2)``: CPU figures differ several-fold between processors of the same core count."""
    model = platform.machine() or "unknown processor"  # where /proc/cpuinfo does not name it
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({torch.backends.cpu.get_cpu_capability()})"


def device_name(device: torch.device) -> str:
    """The GPU's name (``NVIDIA H100 80GB HBM3``), or the CPU's (``cpu: AMD EPYC (AVX2), 2
    threads``)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}: {processor()}, {torch.get_num_threads()} threads"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def command() -> str:
    """This process's command line, as it was typed (``fpeft tune ...``, ``python -m forecast_peft
    tune ...``)."""
    program = Path(sys.argv[0])
    words = ["python", "-m", program.parent.name] if program.name == "__main__.py" else [program.name]
    return shlex.join([*words, *sys.argv[1:]])


def version_lines() -> list[str]:
    """``fpeft --version``: forecast_peft's version and source commit, then what it runs on."""
    found = software()
    commit = f" (source: git {found['source_commit']})" if found["source_commit"] else ""
    cuda = f"CUDA {found['torch_cuda']}" if found["torch_cuda"] else "CPU build"
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [
        f"forecast-peft {found['forecast_peft']}{commit}",
        f"python {found['python']}, torch {found['torch']} ({cuda}; {gpus} GPU(s) visible), "
        f"pytorch-lightning {found['pytorch_lightning']}, numpy {found['numpy']}, "
        f"av2 {found['av2'] or 'not installed'}",
    ]


def record_fit_start(path: Path, trainer) -> None:
    """Append this start of ``trainer``'s fit to a run's ``environment.jsonl`` at ``path``: when,
    the command, the checkpoint it resumed from, the software, and the devices (the first
    process's, their number, the nodes, the precision). ``training.RecordEnvironment`` calls it
    in the first process."""
    entry = {
        "started": _now(),
        "command": command(),
        "resumed_from": str(trainer.ckpt_path) if trainer.ckpt_path else None,
        "software": software(),
        "hardware": {
            "device": device_name(trainer.strategy.root_device),
            "processes": trainer.world_size,
            "nodes": trainer.num_nodes,
            "precision": str(trainer.precision),
        },
    }
    with Path(path).open("a") as log:
        log.write(json.dumps(entry) + "\n")


def evaluation_environment(device: torch.device, precision: str) -> dict:
    """What an evaluation ran with: when, the command, the software, the device and the precision
    it scored in (``OUT/environment.json``)."""
    return {
        "written": _now(),
        "command": command(),
        "software": software(),
        "hardware": {"device": device_name(device), "precision": precision},
    }


def write_environment(out_dir: Path, record: dict) -> Path:
    path = Path(out_dir) / ENVIRONMENT_FILE
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def describe(record: dict) -> str:
    """An evaluation's environment in words, for its report.md: ``forecast-peft 0.1.0 (git
    642ead9), torch 2.13.0+cpu, cpu: AMD EPYC (AVX512), 2 threads, precision 32,
    2026-12-05T09:20:00+00:00``."""
    found, hardware = record["software"], record["hardware"]
    commit = found["source_commit"]
    source = f" (git {commit[:7]}{'-dirty' if commit.endswith('-dirty') else ''})" if commit else ""
    return (
        f"forecast-peft {found['forecast_peft']}{source}, torch {found['torch']}, {hardware['device']}, "
        f"precision {hardware['precision']}, {record['written']}"
    )
