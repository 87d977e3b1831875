"""Metric reports: a printed table, report.json, report.md and a per-scenario CSV."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from forecast_peft.constants import METRICS

COLUMNS = ("name",) + METRICS + ("scenes", "trainable_params")


def format_table(rows: list[dict]) -> str:
    """Markdown table of report rows (also readable in a terminal)."""
    head = "| " + " | ".join(COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    lines = [head, rule]
    for row in rows:
        cells = (
            [row["name"]] + [f"{row[m]:.3f}" for m in METRICS] + [str(row["scenes"]), f"{row['trainable_params']:,}"]
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_reports(rows: list[dict], per_scene: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "md": out_dir / "report.md", "csv": out_dir / "per_scenario.csv"}
    paths["json"].write_text(json.dumps([{k: row[k] for k in COLUMNS} for row in rows], indent=1))
    paths["md"].write_text(format_table(rows) + "\n")
    per_scene.to_csv(paths["csv"], index=False)
    return paths
