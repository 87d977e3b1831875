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
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from forecast_peft.errors import UserError

ACTOR_KEYS = ("positions", "x_angles", "x_velocity", "x_padding_mask", "x_attr")
LANE_KEYS = ("lane_positions", "lane_centers", "lane_angles", "lane_attr", "lane_padding_mask", "is_intersections")
SCENE_KEYS = ("origin", "theta")
META_KEYS = ("scenario_id", "track_id", "city")
INDEX_FILE = "index.json"
REPORT_FILE = "report.json"
LOCK_FILE = ".lock"  # held by the process that changes the cache (preprocess.cache_lock)
FORMAT_VERSION = 1


def write_shard(split_dir: Path, shard_name: str, scenes: list[dict], sources: list[str]) -> Path:
    """Write scenes as one shard, atomically: a temporary directory renamed into place."""
    final = split_dir / shard_name
    tmp = split_dir / f".tmp-{shard_name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for key in ACTOR_KEYS + LANE_KEYS:
        np.save(tmp / f"{key}.npy", np.concatenate([s[key] for s in scenes]))
    np.save(tmp / "actor_offsets.npy", np.cumsum([0] + [len(s["positions"]) for s in scenes]).astype(np.int64))
    np.save(tmp / "lane_offsets.npy", np.cumsum([0] + [len(s["lane_positions"]) for s in scenes]).astype(np.int64))
    np.save(tmp / "origin.npy", np.stack([np.asarray(s["origin"], np.float32).reshape(2) for s in scenes]))
    np.save(tmp / "theta.npy", np.array([s["theta"] for s in scenes], np.float32))
    meta = {key: [s[key] for s in scenes] for key in META_KEYS}
    meta["source"] = sources
    (tmp / "meta.json").write_text(json.dumps(meta))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


@dataclass
class Shard:
    path: Path
    arrays: dict[str, np.ndarray]
    meta: dict[str, list]

    @property
    def num_scenes(self) -> int:
        return len(self.meta["scenario_id"])


def load_shard(path: Path) -> Shard:
    arrays = {}
    for key in ACTOR_KEYS + LANE_KEYS + SCENE_KEYS + ("actor_offsets", "lane_offsets"):
        # a plain ndarray view of the memory map: slicing np.memmap objects costs more than the copy
        arrays[key] = np.load(path / f"{key}.npy", mmap_mode="r").view(np.ndarray)
    meta = json.loads((path / "meta.json").read_text())
    return Shard(path=path, arrays=arrays, meta=meta)


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
    index = json.loads(index_path.read_text())
    if index.get("version") != FORMAT_VERSION:
        raise UserError(f"{index_path}: cache format {index.get('version')} is not {FORMAT_VERSION}; re-run preprocess")
    shards = [load_shard(split_dir / name) for name in index["shards"]]
    if not shards or sum(s.num_scenes for s in shards) == 0:
        raise UserError(
            f"split '{split}' at {split_dir} holds no scenarios: add scenarios to the data root's {split}/ folder "
            f"(or write some with `fpeft synth`) and preprocess again"
        )
    return shards
