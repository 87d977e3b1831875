"""A file that lists scenarios (``fpeft eval --scenarios FILE``, ``fpeft viz --scenarios FILE``):
score or draw those alone, such as the scenes a baseline misses, read from an earlier report's
per_scenario.csv."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from forecast_peft.errors import UserError, reason_of

ID_COLUMN = "scenario_id"
# tables by their name (no line of text to look at); other files by their first line
BINARY_TABLE_SUFFIXES = (".parquet", ".csv.gz")


@dataclass(frozen=True)
class ScenarioList:
    path: Path
    ids: frozenset[str]


def read_scenario_list(path: str | Path) -> ScenarioList:
    """The scenario ids of ``path``: a CSV file with a ``scenario_id`` column (a report's
    per_scenario.csv, filtered or not: each id once), or one id per line (blank lines and lines
    that start with ``#`` are left out); or the ``scenario_id`` column of a parquet or gzipped
    CSV table (an AV2 submission, a `fpeft predict --out NAME.csv.gz` table).

    Raises:
        UserError: a file that is missing, unreadable, or lists no scenario, naming the file.
    """
    path = Path(path).expanduser()
    if path.name.endswith(BINARY_TABLE_SUFFIXES) or "," in _first_line(path):  # a table: its header names the columns
        ids = _table_ids(path)
    else:
        ids = _lines(path)
    if not ids:
        raise UserError(
            f"--scenarios {path}: the file lists no scenario (one id per line, or a CSV file's {ID_COLUMN})"
        )
    return ScenarioList(path, frozenset(ids))


def _first_line(path: Path) -> str:
    """The first line of ``path`` that is not blank or a comment, read alone: a forecast table as
    CSV is 9 million lines."""
    try:
        with path.open() as file:
            return next((line.strip() for line in file if line.strip() and not line.strip().startswith("#")), "")
    except (OSError, UnicodeDecodeError) as err:
        raise _unreadable(path, err) from None


def _lines(path: Path) -> list[str]:
    """A list of one id per line, blank lines and comments left out, a ``scenario_id`` header too."""
    try:
        lines = [line.strip() for line in path.read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as err:
        raise _unreadable(path, err) from None
    lines = [line for line in lines if line and not line.startswith("#")]
    return lines[1:] if lines and lines[0] == ID_COLUMN else lines


def _table_ids(path: Path) -> list[str]:
    """The ids of the ``scenario_id`` column of a CSV file (gzipped or not) or a parquet file, the
    column read alone (a submission's trajectories, a table's rows of steps are most of the file),
    or a one-line error."""
    import pandas as pd

    if not path.is_file():
        raise UserError(f"--scenarios {path}: the file does not exist")
    parquet = path.suffix == ".parquet"
    try:
        if parquet:
            import pyarrow.parquet as pq

            columns = pq.read_schema(path).names
        else:
            columns = [str(c).strip() for c in pd.read_csv(path, nrows=0, comment="#").columns]
        if ID_COLUMN in columns:
            ids = None if parquet else _plain_csv_ids(path)
            if ids is None:
                frame = (
                    pd.read_parquet(path, columns=[ID_COLUMN])
                    if parquet
                    else pd.read_csv(path, usecols=lambda c: str(c).strip() == ID_COLUMN, dtype=str, comment="#")
                )
                ids = frame.iloc[:, 0].dropna().astype(str).unique()
    except Exception as err:  # pandas and pyarrow raise many kinds for a file of another format
        raise _unreadable(path, err) from None
    if ID_COLUMN not in columns:
        raise UserError(
            f"--scenarios {path}: a {'parquet' if parquet else 'CSV'} file without a {ID_COLUMN} column (its "
            f"columns: {', '.join(map(str, columns))})"
        )
    return list(dict.fromkeys(i for i in (str(i).strip() for i in ids) if i))


def _plain_csv_ids(path: Path) -> list[str] | None:
    """The distinct ids of a CSV file's ``scenario_id`` column as pyarrow reads them, as categories
    with the columns before it (a forecast table's is its first): 1.6 s for the 9 million rows of
    the AV2 validation split's forecast table (``make bench-forecasts``), where pandas' reader took
    4.8 s, most of it making a string of each row's id. None where the file is not plain CSV up to
    the id: a ``#`` there starts a comment, which pandas' reader, the one that then reads the file,
    leaves out to the end of its line."""
    import pyarrow as pa
    from pyarrow import csv

    try:
        header = csv.open_csv(path).schema.names
    except Exception:  # any file pyarrow cannot open as CSV goes to pandas, whose error is the one told
        return None
    at = [i for i, name in enumerate(header) if name.strip() == ID_COLUMN]
    if len(at) != 1:  # the column twice, or a comment line read as the header
        return None
    names = header[: at[0] + 1]
    if any("#" in name for name in names):
        return None
    categories = pa.dictionary(pa.int32(), pa.string())
    options = csv.ConvertOptions(include_columns=names, column_types=dict.fromkeys(names, categories))
    try:
        table = csv.read_csv(path, convert_options=options)
    except pa.ArrowException:  # a row of another number of fields, such as a comment line
        return None
    values = [
        list(dict.fromkeys(v for chunk in column.chunks for v in chunk.dictionary.to_pylist())) for column in table
    ]
    return None if any("#" in v for column in values for v in column) else values[-1]


def _unreadable(path: Path, err: Exception) -> UserError:
    problem = "does not exist" if isinstance(err, FileNotFoundError) else f"cannot be read ({reason_of(err, 300)})"
    return UserError(f"--scenarios {path}: the file {problem}")
