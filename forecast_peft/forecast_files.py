"""Forecasts as files: the Argoverse 2 leaderboard submission (parquet) and the forecast table
(CSV) that `fpeft predict` writes, read back so that `fpeft eval --forecasts FILE` scores them
beside checkpoints and baselines, whichever program made them (another method's forecasts of the
validation split, a submission checked before it is uploaded)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from forecast_peft.constants import FUTURE_STEPS, NUM_MODES
from forecast_peft.errors import UserError, count, first_of, reason_of

TABLE_SUFFIXES = (".csv", ".csv.gz")  # predict --out: a table of forecasts instead of a submission
# av2's ChallengeSubmission: a row per scenario, track and mode, each coordinate an array of 60
SUBMISSION_COLUMNS = ("scenario_id", "track_id", "probability", "predicted_trajectory_x", "predicted_trajectory_y")
TABLE_COLUMNS = ("scenario_id", "track_id", "mode", "probability", "step", "x", "y")
KEY = ["scenario_id", "track_id"]


def forecast_table(predictions: dict[str, tuple]) -> pd.DataFrame:
    """Forecasts as one long table: ``scenario_id``, ``track_id``, ``mode`` (0 the most probable),
    ``probability``, ``step`` (1-60: tenths of a second after the present) and the world ``x``,
    ``y`` in metres, from a submission's ``{scenario: (probabilities [6], {track: [6, 60, 2]})}``."""
    ids = list(predictions)
    probs = np.stack([predictions[s][0] for s in ids])  # [S, K]
    tracks = [next(iter(predictions[s][1])) for s in ids]
    world = np.stack([predictions[s][1][t] for s, t in zip(ids, tracks)])  # [S, K, T, 2]
    rank = np.argsort(-probs, axis=1, kind="stable")
    probs = np.take_along_axis(probs, rank, axis=1)
    world = np.take_along_axis(world, rank[:, :, None, None], axis=1)
    scenes, modes, steps = world.shape[:3]
    grid = np.indices((scenes, modes, steps)).reshape(3, -1)  # [3, S*K*T]
    return pd.DataFrame(
        {
            "scenario_id": np.asarray(ids, dtype=object)[grid[0]],
            "track_id": np.asarray(tracks, dtype=object)[grid[0]],
            "mode": grid[1],
            "probability": probs[grid[0], grid[1]],
            "step": grid[2] + 1,
            "x": world[..., 0].reshape(-1),
            "y": world[..., 1].reshape(-1),
        }
    )


def write_table(frame: pd.DataFrame, path: str | Path) -> None:
    """``frame`` as CSV at ``path`` (strings quoted), gzipped at level 1 where it ends ``.gz``:
    pandas' ``to_csv`` took 108 s to write the forecast table of the AV2 validation split (9
    million rows, ``make bench-forecasts``), most of it formatting numbers and gzip's level 9."""
    import gzip

    import pyarrow as pa
    from pyarrow import csv

    table = pa.Table.from_pandas(frame, preserve_index=False)
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb", compresslevel=1) as out:
            csv.write_csv(table, out)
    else:
        csv.write_csv(table, str(path))


@dataclass(frozen=True)
class ForecastFile:
    """The forecasts of one file, a row per (scenario, track) it forecasts.

    ``rows``: (scenario_id, track_id) -> row; ``world`` [R, 6, 60, 2] float64: each row's modes in
    the scenarios' own (city) frame in metres, most probable first; ``probs`` [R, 6]: their
    probabilities, normalised; ``modes`` [R]: how many modes the file gives each row. A row of
    fewer than 6 is filled up with copies of its most probable mode at probability 0, which
    changes none of the metrics: the best of K keeps the first of equal modes."""

    path: Path
    rows: dict[tuple[str, str], int]
    world: np.ndarray
    probs: np.ndarray
    modes: np.ndarray
    unnormalised: int  # rows whose probabilities did not sum to 1 (scored normalised)

    @property
    def scenarios(self) -> set[str]:
        return {scenario for scenario, _ in self.rows}

    @property
    def short(self) -> int:
        """Rows of fewer than 6 modes."""
        return int((self.modes < NUM_MODES).sum())


def read_forecasts(path: str | Path) -> ForecastFile:
    """The forecasts of ``path``: an AV2 submission (parquet: ``SUBMISSION_COLUMNS``, a row per
    mode) or a forecast table (CSV, ``.csv`` or ``.csv.gz``: ``TABLE_COLUMNS``, a row per mode and
    step), as `fpeft predict` writes them.

    Raises:
        UserError: a file that is missing or unreadable, lacks a column, or holds a forecast that
            is not 60 steps, more than 6 modes of a track, or probabilities that are negative, not
            finite or sum to 0; one line that names the file and a scenario.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"--forecasts {path}: {'not a file' if path.exists() else 'the file does not exist'}")
    table = path.name.endswith(TABLE_SUFFIXES)
    columns = TABLE_COLUMNS if table else SUBMISSION_COLUMNS
    try:
        if table:
            frame = _read_table(path)
        else:
            frame = pd.read_parquet(path)
    except Exception as err:  # pandas and pyarrow raise many kinds for a file of another format
        kind = "a CSV forecast table" if table else "a parquet submission"
        raise UserError(f"--forecasts {path}: cannot be read as {kind} ({reason_of(err, 300)})") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        made = "`fpeft predict --out NAME.csv`" if table else "av2's ChallengeSubmission or `fpeft predict`"
        raise UserError(
            f"--forecasts {path}: no column {', '.join(missing)} (its columns: {', '.join(map(str, frame.columns))}); "
            f"expected {', '.join(columns)}, as {made} writes them"
        )
    if frame.empty:
        raise UserError(f"--forecasts {path}: the file holds no forecast")
    if table:
        modes, trajectories = _table_modes(path, frame)
    else:
        modes, trajectories = _submission_modes(path, frame.astype({column: str for column in KEY}))
    return _assemble(path, modes, trajectories)


def _read_table(path: Path) -> pd.DataFrame:
    """A forecast table's rows, read by pyarrow: its ids as categories (the AV2 validation split's
    9 million rows hold 25,000 of them; as strings they took most of the 13 s that pandas' reader
    needed, ``make bench-forecasts``), its numbers parsed exactly (pandas 2.0's parser, the floor,
    reads 1 in 6 of them one unit in the last place off)."""
    import pyarrow as pa
    from pyarrow import csv

    ids, number = pa.dictionary(pa.int32(), pa.string()), pa.float64()
    types = {"scenario_id": ids, "track_id": ids, "probability": number, "x": number, "y": number}
    options = csv.ConvertOptions(column_types=types)
    try:
        return csv.read_csv(path, convert_options=options).to_pandas()
    except pa.ArrowInvalid as err:  # "In CSV column #5: ...": the column's name instead of its index
        at = re.match(r"In CSV column #(\d+): (.*)", str(err), re.S)
        if at is None:
            raise
        names = csv.open_csv(path).schema.names
        raise ValueError(f"column {names[int(at[1])]}: {at[2]}") from None


def _submission_modes(path: Path, frame: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """A submission's modes (scenario_id, track_id, probability) and trajectories [N, 60, 2]."""
    steps = []
    for axis in ("predicted_trajectory_x", "predicted_trajectory_y"):
        lengths = frame[axis].map(lambda values: np.size(values) if values is not None else 0).to_numpy()
        wrong = lengths != FUTURE_STEPS
        if wrong.any():
            at = frame.scenario_id.to_numpy()[wrong]
            raise UserError(
                f"--forecasts {path}: {count(int(wrong.sum()), 'forecast')} of {lengths[wrong][0]} steps in "
                f"{axis}, not {FUTURE_STEPS} (scenario {first_of(list(dict.fromkeys(at)))})"
            )
        steps.append(np.stack([np.asarray(values, dtype=np.float64) for values in frame[axis]]))
    return frame[KEY + ["probability"]].reset_index(drop=True), np.stack(steps, axis=-1)


def _table_modes(path: Path, frame: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """A forecast table's modes (scenario_id, track_id, probability) and trajectories [N, 60, 2]:
    each mode must have every step 1-60 once. ``frame``'s ids are categories (``_read_table``),
    which sort in the order the file first gives them: a table that `fpeft predict` wrote is in
    order already, and the sort that other files need (0.8 s of the 4.1 s that reading the AV2
    validation split's table took, ``make bench-forecasts``) is left out."""
    order = KEY + ["mode", "step"]

    def keys_of(frame: pd.DataFrame) -> list[np.ndarray]:  # the ids' codes, mode, step
        return [frame[c].cat.codes.to_numpy() for c in KEY] + [frame[c].to_numpy() for c in order[2:]]

    keys = keys_of(frame)
    if not _in_order(keys):
        frame = frame.sort_values(order, kind="stable", ignore_index=True)
        keys = keys_of(frame)
    *mode_keys, step = keys
    starts = np.flatnonzero(np.r_[True, np.logical_or.reduce([k[1:] != k[:-1] for k in mode_keys])])
    sizes = np.diff(np.r_[starts, len(frame)])
    wrong = sizes != FUTURE_STEPS
    if not wrong.any():
        steps = step.reshape(-1, FUTURE_STEPS)
        wrong = ~(steps == np.arange(1, FUTURE_STEPS + 1)).all(axis=1)
    if wrong.any():
        first = starts[np.flatnonzero(wrong)[0]]
        raise UserError(
            f"--forecasts {path}: a mode without each step 1-{FUTURE_STEPS} once (scenario "
            f"{frame.scenario_id[first]}, track {frame.track_id[first]}, mode {frame['mode'][first]}); each "
            "scenario, track and mode needs a row per step"
        )
    # the ids' strings, taken from their categories (pandas 2.0 warned of a NaN cast by astype(str))
    modes = frame.iloc[::FUTURE_STEPS][KEY + ["probability"]].astype({column: object for column in KEY})
    modes = modes.reset_index(drop=True)
    xy = frame[["x", "y"]].to_numpy(np.float64).reshape(-1, FUTURE_STEPS, 2)
    return modes, xy


def _in_order(keys: list[np.ndarray]) -> bool:
    """Whether the rows are in the order of ``keys`` (arrays of a value per row, the first the most
    significant), as a stable sort by them would leave them."""
    undecided = np.ones(max(len(keys[0]) - 1, 0), dtype=bool)  # the pairs of rows equal in every key so far
    for key in keys:
        before, after = key[:-1], key[1:]
        if (undecided & (after < before)).any():
            return False
        undecided &= after == before
    return True


def _assemble(path: Path, modes: pd.DataFrame, trajectories: np.ndarray) -> ForecastFile:
    """Group the modes [N] by scenario and track, most probable first, filled up to 6."""
    p = pd.to_numeric(modes["probability"], errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(p) | (p < 0)
    if bad.any():
        first = np.flatnonzero(bad)[0]
        raise UserError(
            f"--forecasts {path}: {count(int(bad.sum()), 'probability')} negative or not a number "
            f"(scenario {modes.scenario_id.iloc[first]}, probability {modes.probability.iloc[first]})"
        )
    bad = ~np.isfinite(trajectories).all(axis=(1, 2))
    if bad.any():  # it would make the minimum over the modes, and every mean, not a number
        first = np.flatnonzero(bad)[0]
        raise UserError(
            f"--forecasts {path}: {count(int(bad.sum()), 'forecast')} with a coordinate that is empty or not a "
            f"finite number (scenario {modes.scenario_id.iloc[first]}, track {modes.track_id.iloc[first]})"
        )
    keys = modes[KEY].reset_index(drop=True).assign(probability=p)  # positions, whatever the file's index
    order = keys.sort_values(KEY + ["probability"], ascending=[True, True, False], kind="stable").index.to_numpy()
    keys = keys.iloc[order].reset_index(drop=True)
    trajectories = trajectories[order]
    groups = keys.groupby(KEY, sort=False)
    row, mode = groups.ngroup().to_numpy(), groups.cumcount().to_numpy()
    size = groups.size()  # a (scenario_id, track_id) index, in the order of ngroup's numbers
    sizes = size.to_numpy()
    if (sizes > NUM_MODES).any():
        first = np.flatnonzero(sizes > NUM_MODES)[0]
        at = size.index[first]
        raise UserError(
            f"--forecasts {path}: {sizes[first]} forecasts of track {at[1]} in scenario {at[0]}; the metrics take at "
            f"most {NUM_MODES} a track (minADE6, minFDE6)"
        )
    num_rows = len(sizes)
    world = np.empty((num_rows, NUM_MODES, FUTURE_STEPS, 2))
    probs = np.zeros((num_rows, NUM_MODES))
    world[row, mode] = trajectories
    probs[row, mode] = keys.probability.to_numpy()
    for m in range(1, NUM_MODES):  # a row of fewer modes: copies of its most probable, never chosen over it
        short = sizes <= m
        world[short, m] = world[short, 0]
    totals = probs.sum(axis=1)
    if (totals <= 0).any():
        scenario = size.index[np.flatnonzero(totals <= 0)[0]][0]
        raise UserError(f"--forecasts {path}: the probabilities of scenario {scenario} sum to 0")
    unnormalised = int((~np.isclose(totals, 1)).sum())  # av2's ChallengeSubmission's test
    return ForecastFile(
        path=path,
        rows={key: i for i, key in enumerate(size.index)},
        world=world,
        probs=probs / totals[:, None],
        modes=sizes,
        unnormalised=unnormalised,
    )


def check_coverage(
    forecasts: ForecastFile, scenarios: list[str], tracks: list[str], where: str, used: str = "scored"
) -> None:
    """Every scenario scored (``scenarios``, with their focal ``tracks``) must have a forecast of
    its focal track in the file (forecasts of other scenarios are left out); else one line that
    says which are missing. ``where``: the split, ``used``: what is done with them, for the message.

    Raises:
        UserError: the file lacks the focal track's forecast of one or more of the scenarios.
    """
    lacking = [s for s, t in zip(scenarios, tracks) if (s, t) not in forecasts.rows]
    if not lacking:
        return
    path = forecasts.path
    held = forecasts.scenarios
    other_track = [s for s in lacking if s in held]
    if other_track:
        focal = dict(zip(scenarios, tracks))
        s = other_track[0]
        theirs = sorted(t for scenario, t in forecasts.rows if scenario == s)
        raise UserError(
            f"--forecasts {path}: {count(len(other_track), 'scenario')} forecast another track than the focal "
            f"one: scenario {s} forecasts track {', '.join(theirs)}, its focal track is {focal[s]}"
        )
    if len(lacking) == len(scenarios):
        raise UserError(
            f"--forecasts {path}: none of the {count(len(scenarios), 'scenario')} {used} ({where}) is in it "
            f"(scenario {first_of(lacking)}): forecasts of another split?"
        )
    raise UserError(
        f"--forecasts {path}: no forecast of {len(lacking):,} of the {count(len(scenarios), 'scenario')} {used} "
        f"({where}; scenario {first_of(lacking)}): take those it holds alone with --scenarios {path}"
    )


def file_predictor(forecasts: ForecastFile):
    """An ``evaluation.Predictor`` of the file's forecasts: a batch's focal tracks' modes in its
    scenes' focal frames [B, 6, 60, 2] (float32) and log-probabilities as scores [B, 6]."""
    import torch

    from forecast_peft.evaluation import probability_scores, to_focal

    def predict(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [forecasts.rows[key] for key in zip(batch["scenario_id"], batch["track_id"])]
        origin = batch["origin"]
        world = torch.from_numpy(forecasts.world[rows]).to(origin.device)
        local = to_focal(world, origin.double(), batch["theta"].double())
        probs = torch.from_numpy(forecasts.probs[rows]).float().to(origin.device)
        return local.float(), probability_scores(probs)

    return predict
