"""How long `fpeft` takes to answer the commands a user types by hand, and the mistakes among
them: the version, the help, a stage's composed configuration, and the one-line errors of a
mistyped key, a missing checkpoint and a missing run to resume. Each is a fresh process, as at
the shell (its imports included), timed from start to exit; the median of ``--repeats`` runs.

    python -m benchmarks.bench_cli --out benchmarks/results/cli_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.machine import cpu_name

# name, arguments, the exit code the command must end with (0: it ran; 1: a user error; 2: a
# configuration error), a piece of its output that shows it answered what was asked
COMMANDS = (
    ("version", ["--version"], 0, "forecast-peft "),
    ("help", ["--help"], 0, "Usage: fpeft"),
    ("stage_help", ["tune", "--help"], 0, "--pretrained"),
    ("tune_print_config", ["tune", "--print-config"], 0, "stage: tune"),
    ("eval_print_config", ["eval", "--print-config"], 0, "stage: eval"),
    ("unknown_key", ["tune", "lr=1"], 2, "did you mean 'optim.lr'"),
    ("missing_checkpoint_eval", ["eval", "-c", "missing.ckpt"], 1, "checkpoint missing.ckpt does not exist"),
    ("missing_checkpoint_viz", ["viz", "-c", "missing.ckpt"], 1, "checkpoint missing.ckpt does not exist"),
    ("missing_resume", ["tune", "--resume", "no/run"], 1, "nothing to resume: no/run does not exist"),
    ("runs_empty_folder", ["runs", "."], 0, "no pre-training or tuning runs"),
)


def fpeft_command() -> list[str]:
    """The installed console script beside this Python, else ``python -m forecast_peft``."""
    script = Path(sys.executable).parent / "fpeft"
    return [str(script)] if script.exists() else [sys.executable, "-m", "forecast_peft"]


def time_command(args: list[str], code: int, shows: str, repeats: int, cwd: Path) -> dict:
    """Median and fastest wall seconds of ``repeats`` fresh runs of ``fpeft ARGS``; each must end
    with ``code`` and print ``shows`` (else this fails: a timing of the wrong answer is none)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run([*fpeft_command(), *args], cwd=cwd, env=env, capture_output=True, text=True)
        seconds.append(time.perf_counter() - start)
        said = done.stdout + done.stderr
        if done.returncode != code or shows not in said:
            raise SystemExit(f"fpeft {' '.join(args)}: exit {done.returncode}, expected {code}: {said.strip()[-500:]}")
    return {"seconds_median": round(statistics.median(seconds), 2), "seconds_min": round(min(seconds), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default="", help="comma-separated names of COMMANDS (default: all)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    only = {name for name in args.only.split(",") if name}
    unknown = only - {name for name, *_ in COMMANDS}
    if unknown:
        parser.error(f"unknown --only {', '.join(sorted(unknown))}")
    result = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "repeats": args.repeats, "commands": {}}
    with tempfile.TemporaryDirectory() as scratch:  # an empty working directory: no data, no runs
        for name, argv, code, shows in COMMANDS:
            if only and name not in only:
                continue
            row = {"command": "fpeft " + " ".join(argv), **time_command(argv, code, shows, args.repeats, Path(scratch))}
            result["commands"][name] = row
            print(json.dumps({name: row}), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
