"""Metric reports: a printed table, report.json, report.md and a per-scenario CSV.

Every metric is a mean over scenes: report.json gives each the half-width of its 95% interval
(Student's t over scenes), and every row but the reference one its difference from the
reference row over the same scenarios with that difference's interval (paired: much tighter
than two rows' own intervals, since both rows share each scene's difficulty). The printed table
and report.md show the paired differences under the metrics, minFDE6 at each horizon 1-6 s
ahead (``by_horizon`` in report.json, ``minFDE6_1s``... in the CSVs), then minFDE6 and MR6 per
object type of the focal agent, per manoeuvre it makes in its ground truth and per city, where
the split has more than one (``by_focal_type``, ``by_manoeuvre`` and ``by_city`` in report.json,
``focal_type``, ``manoeuvre`` and ``city`` in the CSV).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from forecast_peft.constants import (
    CITY,
    FOCAL_TYPE,
    HORIZON_COLUMNS,
    HORIZONS_S,
    MANOEUVRE,
    METRICS,
    MISS_THRESHOLD_M,
    TURN_RAD,
)
from forecast_peft.errors import count

COLUMNS = ("name",) + METRICS + ("scenes", "trainable_params")


def t95(n: int) -> float:
    """Two-sided 95% quantile of Student's t for the mean of ``n`` values (n - 1 degrees of
    freedom): 12.71 for 2 values, 2.09 for 20, 1.98 for 100, towards the normal's 1.96. The
    normal quantile would claim intervals too narrow on small splits (by 7% at 20 scenes, by
    41% at 5)."""
    from scipy.special import stdtrit  # here, not at the top: its import takes half a second

    return float(stdtrit(n - 1, 0.975))


def half_width(values: np.ndarray) -> float | None:
    """Half-width of the 95% interval of the mean of ``values`` (Student's t); None for fewer
    than two values."""
    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return None
    return float(t95(len(values)) * values.std(ddof=1) / math.sqrt(len(values)))


def scene_differences(
    per_scene: pd.DataFrame, name: str, reference: str, columns: tuple[str, ...] = METRICS
) -> pd.DataFrame:
    """Per metric (or other of ``columns``), ``name`` minus ``reference`` on every scenario both
    scored (one row per scenario). ``per_scene``: the per-scenario frame (name, scenario_id,
    metrics)."""
    a = per_scene[per_scene["name"] == name].set_index("scenario_id")[list(columns)]
    b = per_scene[per_scene["name"] == reference].set_index("scenario_id")[list(columns)]
    shared = a.index.intersection(b.index)
    return a.loc[shared] - b.loc[shared]


# each horizon of ``by_horizon`` (1-6 s ahead) and its per-scenario column: minFDE6 at 6 s
HORIZONS = tuple(zip((f"{t}s" for t in (*HORIZONS_S, 6)), (*HORIZON_COLUMNS, "minFDE6"), strict=True))


def _by_horizon(values: pd.DataFrame, diff: pd.DataFrame | None) -> dict:
    """A row's minFDE6 at each horizon (``HORIZONS``) from its per-scenario ``values``, with its 95%
    half-width and, from its per-scenario differences from its reference row (``diff``; None: it
    has none), the mean difference and its half-width (``diff``, ``diff_ci95``)."""
    out = {}
    for horizon, column in HORIZONS:
        out[horizon] = {"minFDE6": float(values[column].mean(skipna=False)), "ci95": half_width(values[column])}
        if diff is not None:
            out[horizon].update(diff=float(diff[column].mean(skipna=False)), diff_ci95=half_width(diff[column]))
    return out


def add_intervals(rows: list[dict], per_scene: pd.DataFrame, reference: str | dict[str, str] | None = None) -> None:
    """Give each report row ``ci95`` (per metric, the half-width of its 95% interval) and each
    row but the ``reference`` one (default: the first row) ``paired``: its reference, the
    scenes both scored, and per metric the mean difference and its 95% half-width.
    ``reference`` may also give each row its own ({row name: reference row name}; rows not in
    it get no ``paired``). Where ``per_scene`` has the ``HORIZON_COLUMNS``, each row's
    ``by_horizon`` too (``_by_horizon``)."""
    if not rows:
        return
    if not isinstance(reference, dict):
        reference = dict.fromkeys((row["name"] for row in rows), reference or rows[0]["name"])
    horizons = set(HORIZON_COLUMNS) <= set(per_scene.columns)
    columns = METRICS + HORIZON_COLUMNS if horizons else METRICS
    for row in rows:
        values = per_scene[per_scene["name"] == row["name"]]
        row["ci95"] = {m: half_width(values[m]) for m in METRICS}
        theirs = reference.get(row["name"], row["name"])
        diff = scene_differences(per_scene, row["name"], theirs, columns) if theirs != row["name"] else None
        if diff is not None:
            row["paired"] = {
                "reference": theirs,
                "scenes": len(diff),
                # skipna=False: a NaN scene (a NaN forecast) makes the difference NaN, as it makes the
                # row's own mean; pandas' default left it out while "scenes" still counted it
                "diff": {m: float(diff[m].mean(skipna=False)) for m in METRICS},
                "ci95": {m: half_width(diff[m]) for m in METRICS},
            }
        if horizons:  # from the same scenes and differences
            row["by_horizon"] = _by_horizon(values, diff)


# the per-scenario columns a report breaks its rows down by: (report.json key, column, the
# printed table's title)
GROUPINGS = (
    ("by_focal_type", FOCAL_TYPE, "minFDE6 / MR6 by the focal agent's type (scenes):"),
    (
        "by_manoeuvre",
        MANOEUVRE,
        "minFDE6 / MR6 by what the focal agent does over the 6 s (scenes; stationary: ends within "
        f"{MISS_THRESHOLD_M:g} m; a turn: its heading turns by more than {math.degrees(TURN_RAD):g} degrees):",
    ),
    ("by_city", CITY, "minFDE6 / MR6 by city (scenes):"),
)


def add_groups(rows: list[dict], per_scene: pd.DataFrame) -> None:
    """Give each report row, for each of ``GROUPINGS``, its scenes and mean metrics per value of
    the column (the most frequent first): per object type of the focal agent (AV2's vehicle,
    pedestrian, cyclist, ...), per manoeuvre (straight, stationary, left or right turn:
    ``evaluation.focal_manoeuvres``) and per city. A model may be good on vehicles, most of AV2's
    focal agents, and poor on the rest, good on straight roads and poor in turns, or good in the
    cities it was trained in and poor in another, while its overall mean hides it."""
    for row in rows:
        values = per_scene[per_scene["name"] == row["name"]]
        for key, column, _ in GROUPINGS:
            groups = values.groupby(column, sort=False)
            order = groups.size().sort_values(ascending=False, kind="stable").index
            row[key] = {str(value): _group_means(groups.get_group(value)) for value in order}


def _group_means(group: pd.DataFrame) -> dict:
    """A group of per-scenario rows' count and mean metrics (NaN where a scene's value is)."""
    return {"scenes": len(group), **{m: float(group[m].mean(skipna=False)) for m in METRICS}}


def means_over(rows: list[dict], key: str) -> list[dict]:
    """The runs of a sweep (rows with swept ``values``) grouped by their values other than
    ``key`` (``seed``: every run of one setting, whatever its seed), one dict per group: its
    ``values``, ``over`` (the key), the ``runs`` (row names), per metric the ``mean`` over the
    runs and the 95% half-width of that mean across them (``ci95``: Student's t over the runs,
    None for one run), and where every run of the group was compared with a reference row
    (``add_intervals``), the same of their paired differences (``diff``, ``diff_ci95``). The
    intervals cover the runs' own variation (their seeds' draws), which the per-row intervals over
    scenes do not."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        values = row.get("values") or {}
        if key in values:
            groups.setdefault(tuple((k, v) for k, v in values.items() if k != key), []).append(row)
    out = []
    for others, members in groups.items():
        group = {"values": dict(others), "over": key, "runs": [row["name"] for row in members]}
        group["mean"] = {m: float(np.mean([row[m] for row in members])) for m in METRICS}
        group["ci95"] = {m: half_width([row[m] for row in members]) for m in METRICS}
        if all("paired" in row for row in members):
            diffs = {m: [row["paired"]["diff"][m] for row in members] for m in METRICS}
            group["reference"] = sorted({row["paired"]["reference"] for row in members})
            group["diff"] = {m: float(np.mean(d)) for m, d in diffs.items()}
            group["diff_ci95"] = {m: half_width(d) for m, d in diffs.items()}
        out.append(group)
    return out


def format_means(groups: list[dict]) -> str:
    """``means_over``'s groups as tables: the means with their intervals across the runs, then
    the means of the paired differences where the groups have them."""
    if not groups:
        return ""
    key = groups[0]["over"]

    def setting(group: dict) -> str:
        return " ".join(f"{k}={v}" for k, v in group["values"].items()) or "all"

    lines = [
        "",
        f"Mean over {key} of each setting's runs, with its 95% interval across them (Student's t over the runs: "
        "their own variation, which the intervals over scenes above leave out):",
        "",
    ]
    lines += markdown_table(
        ["setting", "runs", *METRICS],
        (
            [
                setting(g),
                str(len(g["runs"])),
                *(format_interval(g["mean"][m], g["ci95"][m], signed=False) for m in METRICS),
            ]
            for g in groups
        ),
    )
    paired = [g for g in groups if "diff" in g]
    if paired:
        lines += ["", f"Mean over {key} of the runs' differences from their references (lower is better):", ""]
        lines += markdown_table(
            ["setting", "runs", *METRICS],
            (
                [setting(g), str(len(g["runs"])), *(format_interval(g["diff"][m], g["diff_ci95"][m]) for m in METRICS)]
                for g in paired
            ),
        )
    return "\n".join(lines)


# scenes a checkpoint must rank the same mode first in before the report says so: in a handful,
# one mode may come first by chance
FIXED_RANKING_MIN_SCENES = 20


def add_mode_ranking(rows: list[dict], per_scene: pd.DataFrame) -> None:
    """Give each report row ``top_modes`` (how many scenes each mode came first in, the K=1
    metrics' mode; the most frequent first) and ``top_is_best`` (the share of scenes whose most
    probable mode is also the one nearest the endpoint, which the K=6 metrics score: 1/K for
    scores that rank at random), from the per-scenario ``MODE_COLUMNS``."""
    for row in rows:
        values = per_scene[per_scene["name"] == row["name"]]
        counts = values["top_mode"].value_counts(sort=True)
        row["top_modes"] = {str(int(mode)): int(n) for mode, n in counts.items()}
        row["top_is_best"] = float((values["top_mode"] == values["best_mode"]).mean()) if len(values) else None


def _fixed_ranking_note(rows: list[dict]) -> list[str]:
    """A note on each checkpoint's or ``--forecasts`` file's row whose most probable mode is the
    same one in every scene (of at least ``FIXED_RANKING_MIN_SCENES``): its K=1 metrics are that
    one mode's errors. The baselines rank their modes the same way everywhere by design."""
    fixed = [
        (row["name"], next(iter(row["top_modes"])))
        for row in rows
        if ("checkpoint" in row or "forecasts" in row)
        and len(row.get("top_modes", {})) == 1
        and row["scenes"] >= FIXED_RANKING_MIN_SCENES
    ]
    if not fixed:
        return []
    listing = "; ".join(f"{name}: mode {mode}" for name, mode in fixed)
    return [
        "",
        f"Fixed ranking, the same mode first in every scenario (numbered from 0; {listing}): minADE1 and "
        "minFDE1 are then one mode's errors, whatever the scene, since the scores do not rank the modes "
        "per scene. minADE6, minFDE6 and MR6 do not read the scores.",
    ]


def markdown_table(header, rows) -> list[str]:
    """The lines of a markdown table (also readable in a terminal): ``header`` and each of
    ``rows`` are lists of cell texts."""

    def line(cells) -> str:
        return "| " + " | ".join(cells) + " |"

    return [line(header), "|" + "|".join("---" for _ in header) + "|", *map(line, rows)]


def format_interval(value: float, width: float | None, signed: bool = True) -> str:
    """``+1.234 ± 0.567`` (a value, signed for a difference, and its 95% half-width, if any);
    ``nan`` for a NaN value (a NaN forecast), whose interval is NaN too."""
    if math.isnan(value):
        return "nan"
    text = f"{value:+.3f}" if signed else f"{value:.3f}"
    return text if width is None else f"{text} ± {width:.3f}"


def format_table(rows: list[dict]) -> str:
    """Markdown table of report rows (also readable in a terminal); with ``add_intervals``'s
    fields, a second table of the paired differences from the reference row; with
    ``add_groups``', tables of minFDE6 and MR6 per focal agent type, manoeuvre and city."""
    lines = markdown_table(
        COLUMNS,
        (
            [row["name"], *(f"{row[m]:.3f}" for m in METRICS), str(row["scenes"]), f"{row['trainable_params']:,}"]
            for row in rows
        ),
    )
    paired = [row for row in rows if "paired" in row]
    references, whose = _references(rows)
    if references:
        lines += ["", f"Difference from {whose} over the same scenarios, with its 95% interval (lower is better):"]
        mine = [] if len(references) == 1 else ["reference"]
        lines += [""] + markdown_table(
            ["name", *mine, *METRICS, "scenes"],
            (
                [row["name"], *([row["paired"]["reference"]] if mine else [])]
                + [format_interval(row["paired"]["diff"][m], row["paired"]["ci95"][m]) for m in METRICS]
                + [str(row["paired"]["scenes"])]
                for row in paired
            ),
        )
    notes = _chosen_note(rows) + _fixed_ranking_note(rows) + _settings_note(rows)
    return "\n".join(lines + _horizon_table(rows) + _group_tables(rows) + notes)


def _references(rows: list[dict]) -> tuple[list[str], str]:
    """The rows their paired differences are from (in the order first named) and how a title names
    them: the one, or "each row's reference"."""
    references = list(dict.fromkeys(row["paired"]["reference"] for row in rows if "paired" in row))
    return references, references[0] if len(references) == 1 else "each row's reference"


def _horizon_table(rows: list[dict]) -> list[str]:
    """Each row's minFDE6 at 1-6 s ahead (``by_horizon``), with its paired difference where it has
    one."""
    if not rows or "by_horizon" not in rows[0]:
        return []

    def cell(values: dict) -> str:
        if "diff" not in values:
            return f"{values['minFDE6']:.3f}"
        return f"{values['minFDE6']:.3f} ({format_interval(values['diff'], values['diff_ci95'])})"

    references, whose = _references(rows)
    compared = f"; in brackets, the difference from {whose} with its 95% interval" if references else ""
    title = f"minFDE6 by horizon, each its nearest mode (as if the forecast ended there; at 6 s, minFDE6){compared}:"
    header = ["name", *(f"{horizon[:-1]} s" for horizon, _ in HORIZONS)]
    cells = ([row["name"], *(cell(row["by_horizon"][horizon]) for horizon, _ in HORIZONS)] for row in rows)
    return ["", title, "", *markdown_table(header, cells)]


PLOT_FILE = "report.png"  # what eval --plot draws beside report.json


def plot_report(rows: list[dict], path: str | Path) -> Path:
    """``report_figure(rows)`` as a PNG at ``path``."""
    import matplotlib.pyplot as plt

    fig = report_figure(rows)
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def report_figure(rows: list[dict]):
    """The horizon table (``by_horizon``) drawn: each row's minFDE6 1-6 s ahead with its 95%
    interval and, where rows have a reference, their paired differences from it with theirs (below
    zero: closer than the reference; an interval across zero: not told apart on this split). The
    rows' points stand a little apart along the horizon so that their intervals do not hide each
    other."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = np.array([float(horizon[:-1]) for horizon, _ in HORIZONS])
    references, whose = _references(rows)
    panels = 2 if references else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.8), squeeze=False, layout="constrained")
    errors, diffs = axes[0][0], axes[0][-1]

    def draw(ax, at: np.ndarray, row: dict, key: str, width: str, **style):
        """``row``'s ``key`` at each horizon (drawn at ``at``) with its 95% half-width ``width``
        (none: 0)."""
        values = [row["by_horizon"][horizon] for horizon, _ in HORIZONS]
        y, yerr = [v[key] for v in values], [v[width] or 0.0 for v in values]
        return ax.errorbar(at, y, yerr=yerr, marker="o", ms=4, capsize=3, label=row["name"], **style)

    step = 0.3 / max(len(rows), 1)  # the rows' offsets: 0.3 s across in all
    for i, row in enumerate(rows):
        at = seconds + (i - (len(rows) - 1) / 2) * step
        line = draw(errors, at, row, "minFDE6", "ci95")
        if references and "diff" in row["by_horizon"][HORIZONS[0][0]]:
            draw(diffs, at, row, "diff", "diff_ci95", color=line[0].get_color())
    errors.set_title("minFDE6 by horizon (m), with 95% intervals", fontsize=10)
    errors.legend(fontsize=7)
    if references:
        diffs.axhline(0.0, color="black", lw=0.8, ls="--")
        diffs.set_title(f"difference from {whose} over the same scenarios (m), paired 95% intervals", fontsize=10)
    for ax in axes[0]:
        ax.set_xlabel("seconds ahead (each its nearest mode; 6 s: minFDE6)")
        ax.set_xticks(seconds)
        ax.grid(alpha=0.3)
    return fig


def _settings_note(rows: list[dict]) -> list[str]:
    """The settings in which the checkpoints' runs differ (``stages._add_run_settings``), each
    row's values of them."""
    from forecast_peft.runs import settings_text

    listed = [f"{row['name']}: {settings_text(row['settings'])}" for row in rows if row.get("settings")]
    if not listed:
        return []
    return ["", f"Settings in which the checkpoints' runs differ (how they ran left out): {'; '.join(listed)}."]


def _group_tables(rows: list[dict]) -> list[str]:
    """minFDE6 and MR6 of every row per value of each of ``GROUPINGS`` (focal agent type,
    manoeuvre, city), where the split has more than one."""
    lines = []
    for key, _, title in GROUPINGS:
        values = list(rows[0].get(key, {})) if rows else []
        if len(values) < 2:
            continue
        scenes = rows[0][key]
        header = ["name", *(f"{value} ({scenes[value]['scenes']})" for value in values)]
        cells = ([row["name"], *(_group_cell(row[key].get(value)) for value in values)] for row in rows)
        lines += ["", title, "", *markdown_table(header, cells)]
    return lines


def _group_cell(group: dict | None) -> str:
    return "-" if group is None else f"{group['minFDE6']:.3f} / {group['MR6']:.3f}"


def _chosen_note(rows: list[dict]) -> list[str]:
    """A note on the rows whose checkpoint this split chose (``stages.chosen_on``)."""
    chosen = [row["name"] for row in rows if row.get("chosen_on_this_split")]
    if not chosen:
        return []
    return [
        "",
        f"Optimistic: {', '.join(chosen)} "
        + ("was chosen as its tuning run's best checkpoint" if len(chosen) == 1 else "were chosen as best checkpoints")
        + " by val/minFDE6 on these same scenes, so the figures include that choice (last.ckpt, or scenes the "
        "run never validated on, give unbiased ones).",
    ]


def format_unscored(skipped: list[dict[str, str]]) -> str:
    """The scenarios of the split that could not be read (``cache.read_skipped``), as a list."""
    lines = [f"Not scored: {count(len(skipped), 'scenario')} of the split that could not be read.", ""]
    return "\n".join(lines + [f"- {s['path']}: {s['reason']}" for s in skipped])


def write_reports(
    rows: list[dict],
    per_scene: pd.DataFrame,
    out_dir: str | Path,
    skipped: list[dict[str, str]] = (),
    scored: str = "",
    means: list[dict] = (),
) -> dict[str, Path]:
    """report.json (the rows: a checkpoint's or forecast file's path and, for a sweep's run, its
    swept ``values``; ``unscored``: the split's scenarios that could not be read, each row's
    metrics leave them out), report.md (the tables, then those scenarios with the reasons,
    then ``scored``: what the scores were made on and with), report.csv (``summary_frame``)
    and per_scenario.csv. A NaN value (a predictor's NaN forecast) is ``null`` in report.json,
    which strict JSON readers (jq, JavaScript's JSON.parse) refuse as NaN, and empty in the CSVs."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "report.json",
        "md": out_dir / "report.md",
        "summary": out_dir / "report.csv",
        "csv": out_dir / "per_scenario.csv",
    }
    keys = COLUMNS + (
        "checkpoint",
        "forecasts",
        "values",
        "settings",
        "chosen_on_this_split",
        "ci95",
        "paired",
        "by_focal_type",
        "by_manoeuvre",
        "by_city",
        "by_horizon",
        "top_modes",
        "top_is_best",
    )
    unscored = len(skipped)
    paths["json"].write_text(
        json.dumps(
            [_null_for_nan({**{k: row[k] for k in keys if k in row}, "unscored": unscored}) for row in rows],
            indent=1,
            allow_nan=False,
        )
    )
    unread = f"\n{format_unscored(skipped)}\n" if skipped else ""
    paths["md"].write_text(
        format_table(rows) + format_means(means) + "\n" + unread + (f"\n{scored}\n" if scored else "")
    )
    if means:
        paths["means"] = out_dir / "report_means.csv"
    with np.errstate(invalid="ignore"):  # pandas 2.0 casts a NaN (a damaged scene's value) with numpy's warning
        if means:
            means_frame(means).to_csv(paths["means"], index=False)
        summary_frame(rows).to_csv(paths["summary"], index=False)
        per_scene.to_csv(paths["csv"], index=False)
    return paths


def means_frame(groups: list[dict]) -> pd.DataFrame:
    """report_means.csv: a row per ``means_over`` group: its other values (a column per key), the
    key the means are over, its runs (how many and their names), and per metric the mean with its
    interval (``<metric>_ci95``) and, where the runs were compared, the mean difference
    (``<metric>_diff``, ``<metric>_diff_ci95``)."""
    keys, records = _swept_keys(groups), []
    for group in groups:
        record = {key: group["values"].get(key, "") for key in keys}
        record.update(over=group["over"], runs=len(group["runs"]), names="; ".join(group["runs"]))
        record.update(_interval_columns(group["mean"], group["ci95"]))
        record.update(_interval_columns(group.get("diff"), group.get("diff_ci95"), "_diff"))
        records.append(record)
    return pd.DataFrame(records)


def summary_frame(rows: list[dict]) -> pd.DataFrame:
    """report.csv: a row per report row, for a spreadsheet or pandas: its name, checkpoint (and,
    where a ``--forecasts`` file was scored, a ``forecasts`` column of their paths), a sweep run's
    swept values (a column per key), scenes, trainable parameters, every metric with its 95%
    half-width (``<metric>_ci95``), and the paired difference from its reference row with that
    difference's half-width (``reference``, ``<metric>_diff``, ``<metric>_diff_ci95``)."""
    keys, records = _swept_keys(rows), []
    files = any("forecasts" in row for row in rows)
    for row in rows:
        record = {"name": row["name"], "checkpoint": row.get("checkpoint", "")}
        if files:  # the column only where a --forecasts file was scored
            record["forecasts"] = row.get("forecasts", "")
        record.update({key: row.get("values", {}).get(key, "") for key in keys})
        record.update(scenes=row["scenes"], trainable_params=row["trainable_params"])
        record.update(_interval_columns(row, row.get("ci95", {})))
        paired = row.get("paired") or {}
        record["reference"] = paired.get("reference", "")
        record.update(_interval_columns(paired.get("diff"), paired.get("ci95"), "_diff"))
        for horizon, column in HORIZONS[:-1]:  # the last, at 6 s, is minFDE6's
            values = row.get("by_horizon", {}).get(horizon, {})
            for key, suffix in (("minFDE6", ""), ("ci95", "_ci95"), ("diff", "_diff"), ("diff_ci95", "_diff_ci95")):
                record[column + suffix] = values.get(key)
        records.append(record)
    return pd.DataFrame(records)


def _swept_keys(items: list[dict]) -> list[str]:
    """The keys of the swept ``values`` of any of ``items`` (report rows or ``means_over``'s
    groups), in the order they first come: a CSV column each."""
    return list(dict.fromkeys(key for item in items for key in item.get("values", {})))


def _interval_columns(values: dict | None, widths: dict | None, suffix: str = "") -> dict:
    """``<metric><suffix>`` and ``<metric><suffix>_ci95`` of every metric, from ``values`` and
    their 95% half-widths ``widths``; empty cells where there are none (a row not compared)."""
    columns = {}
    for m in METRICS:
        columns[f"{m}{suffix}"] = values[m] if values else None
        columns[f"{m}{suffix}_ci95"] = (widths or {}).get(m)
    return columns


def _null_for_nan(value):
    """``value`` with every NaN or infinite float in it, at any depth of dicts and lists, as None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _null_for_nan(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_null_for_nan(item) for item in value]
    return value
