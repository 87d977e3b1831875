"""The speed issue's targets (#8, for one H100 at batch 128) against the files a run of the
benchmarks wrote: for each target, the row that comes closest to it, its figure and whether it
meets it, on the device that row names (the targets are an H100's: a figure from another GPU
says how that one did). Reads ``bench_train.py`` rows and ``check_bf16.py`` results; other
files (the attention benchmark's rows, logs) are passed over.

    python -m benchmarks.targets benchmarks/results/gpu/*.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BATCH = 128
# (what, the rows' task, the field, at least or at most, the figure)
TARGETS = (
    ("PEFT tuning", "peft", "scenes_per_s", "at least", 2000.0),
    ("PEFT peak memory", "peft", "peak_mem_gb", "at most", 7.6),
    ("MAE pre-training", "pretrain", "scenes_per_s", "at least", 1500.0),
    ("inference", "infer", "scenes_per_s", "at least", 10000.0),
)
BF16_TOLERANCE = 0.01  # bf16 minFDE6 within 1% of fp32's
# what a verdict's row says of the run that made it
ROW_FIELDS = ("gpu", "precision", "compiled", "compile_mode", "attention_kernel")


def read(paths: list[Path | str]) -> tuple[list[dict], list[dict]]:
    """The benchmark rows and the bf16 checks in ``paths`` (files that are neither are skipped)."""
    rows, checks = [], []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "minFDE6_rel_diff" in data:
            checks.append(data)
        elif isinstance(data, list):
            rows += [r for r in data if isinstance(r, dict) and "task" in r and "scenes_per_s" in r]
    return rows, checks


def verdicts(rows: list[dict], checks: list[dict]) -> list[dict]:
    """One line per target: the best figure of the batch-128 rows of its task (for peak memory,
    that of the fastest such row, the form a user would run), or none measured."""
    out = []
    for what, task, field, bound, target in TARGETS:
        candidates = [r for r in rows if r["task"] == task and r.get("batch") == BATCH and r.get(field) is not None]
        line = {"target": what, "needed": f"{bound} {target:g}", "measured": None, "met": None, "row": None}
        if candidates:
            best = max(candidates, key=lambda r: r["scenes_per_s"])
            value = best[field]
            line.update(measured=value, met=value >= target if bound == "at least" else value <= target)
            line["row"] = ", ".join(f"{k} {best[k]}" for k in ROW_FIELDS if best.get(k))
        out.append(line)
    bf16 = {
        "target": "bf16 minFDE6 against fp32",
        "needed": f"within {BF16_TOLERANCE:.0%}",
        "measured": None,
        "met": None,
        "row": None,
    }
    if checks:
        worst = max(checks, key=lambda c: abs(c["minFDE6_rel_diff"]))
        bf16.update(measured=f"{worst['minFDE6_rel_diff']:.2g}", met=abs(worst["minFDE6_rel_diff"]) <= BF16_TOLERANCE)
        bf16["row"] = f"gpu {worst.get('device')}"
    out.append(bf16)
    return out


def met(paths: list[Path | str], target: str) -> bool:
    """Whether the rows of ``paths`` meet ``target`` (a name of ``TARGETS``); False where none
    measures it."""
    return any(line["met"] for line in verdicts(*read(paths)) if line["target"] == target)


def table(lines: list[dict]) -> str:
    said = {True: "met", False: "NOT met", None: "not measured"}
    out = ["| target (one H100, batch 128) | needed | measured | verdict | row |", "|---|---|---|---|---|"]
    for line in lines:
        measured = "-" if line["measured"] is None else line["measured"]
        out.append(f"| {line['target']} | {line['needed']} | {measured} | {said[line['met']]} | {line['row'] or '-'} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path)
    args = parser.parse_args()
    print(table(verdicts(*read(args.files))))


if __name__ == "__main__":
    main()
