"""A file that lists scenarios (``fpeft eval --scenarios FILE``, ``fpeft viz --scenarios FILE``):
score or draw those alone, such as the scenes a baseline misses, read from an earlier report's
per_scenario.csv."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from forecast_peft.errors import UserError, reason_of

ID_COLUMN = "scenario_id"
PANDAS_SUFFIXES = (".parquet", ".csv.gz")  # read by pandas; other files as text


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
    if path.name.endswith(PANDAS_SUFFIXES):
        return ScenarioList(path, frozenset(_table_ids(path)))
    try:
        lines = [line.strip() for line in path.read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as err:
        problem = "does not exist" if isinstance(err, FileNotFoundError) else f"cannot be read ({err})"
        raise UserError(f"--scenarios {path}: the file {problem}") from None
    lines = [line for line in lines if line and not line.startswith("#")]
    if lines and "," in lines[0]:  # a CSV file: its header names the columns
        header = [name.strip().strip('"') for name in lines[0].split(",")]
        if ID_COLUMN not in header:
            raise UserError(
                f"--scenarios {path}: a CSV file without a {ID_COLUMN} column (its columns: {', '.join(header)})"
            )
        import pandas as pd

        ids = pd.read_csv(path, usecols=[ID_COLUMN], dtype=str, comment="#")[ID_COLUMN].dropna().str.strip()
        lines = [i for i in ids if i]
    elif lines and lines[0] == ID_COLUMN:  # a one-column CSV file
        lines = lines[1:]
    if not lines:
        raise UserError(
            f"--scenarios {path}: the file lists no scenario (one id per line, or a CSV file's {ID_COLUMN})"
        )
    return ScenarioList(path, frozenset(lines))


def _table_ids(path: Path) -> list[str]:
    """The ids of a parquet or gzipped CSV table's ``scenario_id`` column, or a one-line error."""
    import pandas as pd

    if not path.is_file():
        raise UserError(f"--scenarios {path}: the file does not exist")
    try:
        if path.suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            frame = pd.read_csv(path, dtype={ID_COLUMN: str}, comment="#")
    except Exception as err:  # pandas and pyarrow raise many kinds for a file of another format
        raise UserError(f"--scenarios {path}: the file cannot be read ({reason_of(err, 300)})") from None
    if ID_COLUMN not in frame.columns:
        raise UserError(
            f"--scenarios {path}: a table without a {ID_COLUMN} column (its columns: "
            f"{', '.join(map(str, frame.columns))})"
        )
    ids = [i for i in frame[ID_COLUMN].dropna().astype(str).str.strip().unique() if i]
    if not ids:
        raise UserError(f"--scenarios {path}: the table lists no scenario")
    return ids
