"""The packed feature cache: a split is a few shard directories of flat .npy arrays.

Layout of ``<cache_dir>/<split>/``::

    index.json            written last: the split is complete; lists shards and counts
    report.json           scenarios skipped, with the reason for each
    shard-00000/          one atomic rename per shard
        meta.json         scenario ids, focal track ids, cities, source directories
        actor_offsets.npy [S+1]  rows of scene s are actor_offsets[s]:actor_offsets[s+1]
        lane_offsets.npy  [S+1]
        origin.npy [S, 2], theta.npy [S]
        positions.npy [A, 110, 2], x_angles.npy [A, 110], x_velocity.npy [A, 110],
        x_padding_mask.npy [A, 110], x_attr.npy [A, 3]
        lane_positions.npy [L, 20, 2], lane_centers.npy [L, 2], lane_angles.npy [L],
        lane_attr.npy [L, 3], lane_padding_mask.npy [L, 20], is_intersections.npy [L]

Only the local-frame tracks are stored; displacements and targets are derived when batches are
built (``features.derive_actor_features``), the same code that ``extract`` uses.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from forecast_peft.data.files import atomic_directory
from forecast_peft.errors import UserError, count, first_of

ACTOR_KEYS = ("positions", "x_angles", "x_velocity", "x_padding_mask", "x_attr")
LANE_KEYS = ("lane_positions", "lane_centers", "lane_angles", "lane_attr", "lane_padding_mask", "is_intersections")
SCENE_KEYS = ("origin", "theta")
META_KEYS = ("scenario_id", "track_id", "city")
INDEX_FILE = "index.json"
REPORT_FILE = "report.json"
LOCK_FILE = ".lock"  # held by the process that changes the cache (preprocess.cache_lock)
FORMAT_VERSION = 1


def write_shard(split_dir: Path, shard_name: str, scenes: list[dict], sources: list[str]) -> Path:
    """Write scenes as one shard, atomically: a temporary directory renamed into place. A write
    that fails (a full disk) stops in one line; the shards written before it stay, and
    preprocessing goes on from them."""
    final = split_dir / shard_name
    hint = "free some space or set data.cache_dir= on a larger disk, then run again (the shards written so far stay)"
    with atomic_directory(final, "the cache shard", hint) as tmp:
        for key in ACTOR_KEYS + LANE_KEYS:
            np.save(tmp / f"{key}.npy", np.concatenate([s[key] for s in scenes]))
        np.save(tmp / "actor_offsets.npy", np.cumsum([0] + [len(s["positions"]) for s in scenes]).astype(np.int64))
        np.save(tmp / "lane_offsets.npy", np.cumsum([0] + [len(s["lane_positions"]) for s in scenes]).astype(np.int64))
        np.save(tmp / "origin.npy", np.stack([np.asarray(s["origin"], np.float32).reshape(2) for s in scenes]))
        np.save(tmp / "theta.npy", np.array([s["theta"] for s in scenes], np.float32))
        meta = {key: [s[key] for s in scenes] for key in META_KEYS}
        meta["source"] = sources
        (tmp / "meta.json").write_text(json.dumps(meta))
    return final


@dataclass
class Shard:
    path: Path
    arrays: dict[str, np.ndarray]
    meta: dict[str, list]

    @property
    def num_scenes(self) -> int:
        return len(self.meta["scenario_id"])


OFFSET_KEYS = ("actor_offsets", "lane_offsets")
ARRAY_KEYS = ACTOR_KEYS + LANE_KEYS + SCENE_KEYS + OFFSET_KEYS


class DamagedShard(UserError):
    """A shard directory with a file missing, cut short or unreadable (a disk that filled up, a copy
    that stopped half-way)."""

    def __init__(self, path: Path, problem: str, sources: list[str] | None = None):
        super().__init__(f"{path}: damaged cache shard ({problem})")
        self.path = path
        self.sources = sources  # its scenario directories, where its meta.json could be read


class _Header(NamedTuple):
    shape: tuple[int, ...]


def _npy_header(path: Path) -> _Header:
    """A .npy file's shape, from its header, after checking that the file holds all of its data."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        short = os.fstat(f.fileno()).st_size < f.tell() + int(np.prod(shape)) * dtype.itemsize
    if short:
        raise ValueError("cut short")
    return _Header(shape)


def _mapped(path: Path) -> np.ndarray:
    # a plain ndarray view of the memory map: slicing np.memmap objects costs more than the copy
    return np.load(path, mmap_mode="r").view(np.ndarray)  # ValueError where the file is cut short


def _read_shard(path: Path, read_array) -> tuple[dict[str, list], dict]:
    """A shard's meta.json and ``read_array`` of each of its arrays, checked: every file there,
    whole (as long as its header says) and of as many rows as the others of its kind.

    Raises:
        DamagedShard: naming the shard and what is wrong with it.
    """
    name, sources = "meta.json", None
    try:
        meta = json.loads((path / name).read_text())
        num = len(meta["scenario_id"])
        if any(len(meta[key]) != num for key in META_KEYS + ("source",)):
            raise ValueError("its lists differ in length")
        sources = meta["source"]
        arrays = {}
        for key in ARRAY_KEYS:
            name = f"{key}.npy"
            arrays[key] = read_array(path / name)
    except FileNotFoundError:
        raise DamagedShard(path, f"{name} is missing", sources) from None
    except KeyError as err:
        raise DamagedShard(path, f"{name} has no {err}") from None
    except (OSError, ValueError, TypeError, EOFError) as err:
        raise DamagedShard(path, f"{name}: {getattr(err, 'strerror', None) or err}", sources) from None
    rows = {key: arrays[key].shape[0] if arrays[key].shape else -1 for key in ARRAY_KEYS}
    groups = [
        ("scene", SCENE_KEYS, num),
        ("offset", OFFSET_KEYS, num + 1),
        ("actor", ACTOR_KEYS, rows[ACTOR_KEYS[0]]),
        ("lane", LANE_KEYS, rows[LANE_KEYS[0]]),
    ]
    for group, keys, expected in groups:
        if any(rows[key] != expected for key in keys):
            raise DamagedShard(path, f"its {group} arrays differ in length for {num} scenes", sources)
    return meta, arrays


def read_shard_meta(path: Path) -> dict[str, list]:
    """A finished shard's meta.json (scenario ids, sources ...), after checking from the array
    headers and file sizes, without reading or mapping the arrays, that the shard is whole.
    Raises DamagedShard."""
    return _read_shard(path, _npy_header)[0]


def load_shard(path: Path) -> Shard:
    """A shard's arrays, memory-mapped, and its meta.json, checked as ``read_shard_meta`` does.
    Raises DamagedShard."""
    meta, arrays = _read_shard(path, _mapped)
    return Shard(path=path, arrays=arrays, meta=meta)


def nonfinite_values(path: Path, chunk_rows: int = 1 << 14) -> list[tuple[str, int, list[str]]]:
    """The float arrays of the shard at ``path`` that hold NaN or inf values, which preprocessing
    never writes (it refuses scenarios with them): a copy or a disk that changed bytes without
    cutting the file short, which ``load_shard``'s checks cannot see. [(file name, how many such
    values, the scenario ids of the scenes they lie in)]. Reads every value, ``chunk_rows`` rows
    at a time. Raises DamagedShard as ``load_shard`` does."""
    shard = load_shard(path)
    offsets = dict.fromkeys(ACTOR_KEYS, shard.arrays["actor_offsets"]) | dict.fromkeys(
        LANE_KEYS, shard.arrays["lane_offsets"]
    )
    found = []
    for key in ARRAY_KEYS:
        array = shard.arrays[key]
        if not np.issubdtype(array.dtype, np.floating):
            continue
        values, rows = 0, []
        for start in range(0, len(array), chunk_rows):
            part = array[start : start + chunk_rows]
            bad = ~np.isfinite(part.reshape(len(part), -1))
            values += int(bad.sum())
            rows.append(start + np.flatnonzero(bad.any(axis=1)))
        if values:
            rows = np.concatenate(rows)
            scenes = np.searchsorted(offsets[key], rows, side="right") - 1 if key in offsets else rows
            found.append((f"{key}.npy", values, [shard.meta["scenario_id"][i] for i in np.unique(scenes)]))
    return found


def damaged_values(cache_dir: str | Path, splits: tuple[str, ...]) -> list[tuple[Path, str]]:
    """Each array file of the splits' cache that holds NaN or inf values (``nonfinite_values``):
    (its shard folder, a line with its path, how many, and a scenario they lie in). Shards that
    ``load_shard`` finds damaged are left to the cache check of the next stage, which names them."""
    lines = []
    for split in splits:
        for path in completed_shards(Path(cache_dir) / split):
            try:
                found = nonfinite_values(path)
            except DamagedShard:
                continue
            for name, values, ids in found:
                lines.append((path, f"{path / name} holds {count(values, 'NaN/inf value')} (scenario {first_of(ids)})"))
    return lines


def damage_line(cache_dir: str | Path, splits: tuple[str, ...]) -> str | None:
    """What ``damaged_values`` finds in the splits' cache, and what to do, in words for the end of
    a one-line message (the first three files and shard folders); None where it finds nothing."""
    damaged = damaged_values(cache_dir, splits)
    if not damaged:
        return None
    files = "; ".join(line for _, line in damaged[:3])
    more = f" (and {count(len(damaged) - 3, 'more file')})" if len(damaged) > 3 else ""
    folders = list(dict.fromkeys(str(folder) for folder, _ in damaged))
    delete = " ".join(folders[:3]) + (f" and {count(len(folders) - 3, 'more shard')}" if len(folders) > 3 else "")
    return (
        f"the cache is damaged: {files}{more}, values that preprocessing never writes; delete {delete} (the next "
        "run caches the scenarios again from the data root)"
    )


def completed_shards(split_dir: Path) -> list[Path]:
    """Shard directories fully written (temporary ones are ignored)."""
    if not split_dir.is_dir():
        return []
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and p.name.startswith("shard-"))


def read_skipped(cache_dir: str | Path, split: str) -> list[dict[str, str]]:
    """The scenarios of ``split`` that preprocessing could not read: [{"path", "reason"}]."""
    path = Path(cache_dir) / split / REPORT_FILE
    return json.loads(path.read_text())["skipped"] if path.exists() else []


def open_split(cache_dir: str | Path, split: str) -> list[Shard]:
    """All shards of a complete cached split.

    Raises:
        UserError: when the split was never cached or its preprocessing did not finish.
    """
    split_dir = Path(cache_dir) / split
    index_path = split_dir / INDEX_FILE
    if not index_path.exists():
        raise UserError(
            f"no complete cache for split '{split}' at {split_dir}: run `fpeft preprocess data.root=...` first"
        )
    try:
        index = json.loads(index_path.read_text())
    except ValueError as err:
        raise UserError(f"{index_path}: unreadable cache index ({err}); `fpeft preprocess` writes it again") from None
    if index.get("version") != FORMAT_VERSION:
        raise UserError(f"{index_path}: cache format {index.get('version')} is not {FORMAT_VERSION}; re-run preprocess")
    try:
        shards = [load_shard(split_dir / name) for name in index["shards"]]
    except DamagedShard as err:
        raise UserError(f"{err}; `fpeft preprocess` with the split's data root caches it again") from None
    if not shards or sum(s.num_scenes for s in shards) == 0:
        skipped = read_skipped(cache_dir, split)
        if skipped:  # the scenarios are there, and none could be read: say why, not "add scenarios"
            first = skipped[0]
            more = f" and {len(skipped) - 1} more" if len(skipped) > 1 else ""
            raise UserError(
                f"split '{split}' at {split_dir} holds no scenarios: none of the {len(skipped)} under the data root "
                f"could be read ({first['path']}: {first['reason']}{more}; {split_dir / REPORT_FILE} lists them)"
            )
        raise UserError(
            f"split '{split}' at {split_dir} holds no scenarios: add scenarios to the data root's {split}/ folder "
            f"(or write some with `fpeft synth`) and preprocess again"
        )
    return shards
