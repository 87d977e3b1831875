"""Dataset over the packed cache, and the collate that pads scenes into a batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from forecast_peft.constants import LANE_POINTS, TOTAL_STEPS
from forecast_peft.data.cache import ACTOR_KEYS, LANE_KEYS, META_KEYS, open_split
from forecast_peft.data.features import derive_actor_features


def subset_indices(num: int, fraction: float, seed: int) -> np.ndarray:
    """A deterministic, seeded subset of ``round(num * fraction)`` scene indices (at least 1), sorted."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {fraction}")
    if fraction >= 1.0:
        return np.arange(num)
    keep = max(1, round(num * fraction))
    return np.sort(np.random.default_rng(seed).permutation(num)[:keep])


class ForecastDataset(Dataset):
    """Scenes of one cached split. ``dataset[i]`` is one scene's stored arrays; ``__getitems__``
    (used by the DataLoader) returns a whole padded batch built with vectorised numpy."""

    def __init__(self, cache_dir: str | Path, split: str, fraction: float = 1.0, seed: int = 0):
        self.split = split
        self.with_future = split != "test"
        self.shards = open_split(cache_dir, split)
        counts = [s.num_scenes for s in self.shards]
        shard_of = np.repeat(np.arange(len(self.shards)), counts)
        local = np.concatenate([np.arange(c) for c in counts])
        keep = subset_indices(len(shard_of), fraction, seed)
        self._shard = shard_of[keep]
        self._local = local[keep]

    def __len__(self) -> int:
        return len(self._shard)

    def scenario_ids(self) -> list[str]:
        return [self.shards[s].meta["scenario_id"][i] for s, i in zip(self._shard, self._local)]

    def __getitem__(self, index: int) -> dict:
        shard = self.shards[self._shard[index]]
        i = int(self._local[index])
        arr = shard.arrays
        a0, a1 = arr["actor_offsets"][i], arr["actor_offsets"][i + 1]
        l0, l1 = arr["lane_offsets"][i], arr["lane_offsets"][i + 1]
        scene = {k: arr[k][a0:a1] for k in ACTOR_KEYS}
        scene.update({k: arr[k][l0:l1] for k in LANE_KEYS})
        scene["origin"] = arr["origin"][i]
        scene["theta"] = arr["theta"][i]
        scene.update({k: shard.meta[k][i] for k in META_KEYS})
        return scene

    def __getitems__(self, indices: list[int]) -> dict:
        return collate_scenes([self[i] for i in indices], with_future=self.with_future)


def collate_scenes(scenes: list[dict], with_future: bool = True) -> dict:
    """Pad stored scenes to the largest in the batch and derive the model inputs.

    Returns tensors: x [B, N, 50, 2], y [B, N, 60, 2] (absent without future), x_attr [B, N, 3],
    x_positions [B, N, 50, 2], x_centers [B, N, 2], x_angles / x_velocity / x_padding_mask
    [B, N, 110], x_velocity_diff [B, N, 50], x_key_padding_mask [B, N], lane_positions
    [B, M, 20, 2], lane_centers [B, M, 2], lane_angles [B, M], lane_attr [B, M, 3],
    lane_padding_mask [B, M, 20], lane_key_padding_mask [B, M], is_intersections [B, M],
    origin [B, 2], theta [B], actor_index [A] and lane_index [L] (flat indices of the real actors
    and lanes); and lists scenario_id, track_id, city.
    """
    b = len(scenes)
    n = max(len(s["positions"]) for s in scenes)
    m = max(1, max(len(s["lane_positions"]) for s in scenes))
    positions = np.zeros((b, n, TOTAL_STEPS, 2), np.float32)
    angles = np.zeros((b, n, TOTAL_STEPS), np.float32)
    speed = np.zeros((b, n, TOTAL_STEPS), np.float32)
    pad = np.ones((b, n, TOTAL_STEPS), bool)
    attr = np.zeros((b, n, 3), np.uint8)
    lanes = np.zeros((b, m, LANE_POINTS, 2), np.float32)
    lane_ctr = np.zeros((b, m, 2), np.float32)
    lane_ang = np.zeros((b, m), np.float32)
    lane_attr = np.zeros((b, m, 3), np.float32)
    lane_pad = np.ones((b, m, LANE_POINTS), bool)
    inter = np.zeros((b, m), np.float32)
    for i, s in enumerate(scenes):
        a, nl = len(s["positions"]), len(s["lane_positions"])
        positions[i, :a] = s["positions"]
        angles[i, :a] = s["x_angles"]
        speed[i, :a] = s["x_velocity"]
        pad[i, :a] = s["x_padding_mask"]
        attr[i, :a] = s["x_attr"]
        lanes[i, :nl] = s["lane_positions"]
        lane_ctr[i, :nl] = s["lane_centers"]
        lane_ang[i, :nl] = s["lane_angles"]
        lane_attr[i, :nl] = s["lane_attr"]
        lane_pad[i, :nl] = s["lane_padding_mask"]
        inter[i, :nl] = s["is_intersections"]
    derived = derive_actor_features(positions, speed, pad, with_future=with_future)
    actor_pad, lanes_pad = pad.all(-1), lane_pad.all(-1)
    t = torch.from_numpy
    batch = {
        "x": t(derived["x"]),
        "x_attr": t(attr),
        "x_positions": t(derived["x_positions"]),
        "x_centers": t(derived["x_centers"]),
        "x_angles": t(angles),
        "x_velocity": t(speed),
        "x_velocity_diff": t(derived["x_velocity_diff"]),
        "x_padding_mask": t(pad),
        "x_key_padding_mask": t(actor_pad),
        # flat indices of the real actors and lanes (sizes known on the host, so the encoders
        # skip padding slots without a device-to-host synchronisation)
        "actor_index": t(np.flatnonzero(~actor_pad.reshape(-1))),
        "lane_index": t(np.flatnonzero(~lanes_pad.reshape(-1))),
        "lane_positions": t(lanes),
        "lane_centers": t(lane_ctr),
        "lane_angles": t(lane_ang),
        "lane_attr": t(lane_attr),
        "lane_padding_mask": t(lane_pad),
        "lane_key_padding_mask": t(lanes_pad),
        "is_intersections": t(inter),
        "origin": t(np.stack([np.asarray(s["origin"], np.float32).reshape(2) for s in scenes])),
        "theta": t(np.array([s["theta"] for s in scenes], np.float32)),
        "scenario_id": [s["scenario_id"] for s in scenes],
        "track_id": [s["track_id"] for s in scenes],
        "city": [s["city"] for s in scenes],
    }
    if with_future:
        batch["y"] = t(derived["y"])
    return batch


class PackedBatch(dict):
    """A batch that crosses from a DataLoader worker to the main process as ONE shared-memory
    buffer instead of one per tensor (creating and mapping ~20 segments per batch costs more than
    building the batch). The main process gets a plain dict of views into that buffer."""

    def __reduce__(self):
        tensors = {k: v for k, v in self.items() if isinstance(v, torch.Tensor)}
        others = {k: v for k, v in self.items() if not isinstance(v, torch.Tensor)}
        layout, offset = [], 0
        for key, value in tensors.items():
            layout.append((key, offset, value.dtype, tuple(value.shape)))
            offset += -(-value.numel() * value.element_size() // 64) * 64  # 64-byte aligned
        buffer = torch.empty(0, dtype=torch.uint8).set_(_shared_storage(offset))
        for (_, start, _, _), value in zip(layout, tensors.values()):
            flat = value.contiguous().view(-1).view(torch.uint8)
            buffer[start : start + flat.numel()].copy_(flat)
        return _unpack_batch, (buffer, layout, others)


def _shared_storage(size: int) -> torch.UntypedStorage:
    """Storage allocated in shared memory from the start: pickling it sends a handle, without
    the copy (and page faults) of moving an ordinary buffer into shared memory."""
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
    return new_shared(size) if new_shared is not None else torch.UntypedStorage(size)


def _unpack_batch(buffer: torch.Tensor, layout: list, others: dict) -> dict:
    batch = {}
    for key, start, dtype, shape in layout:
        size = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dtype).element_size()
        batch[key] = buffer[start : start + size].view(dtype).view(shape)
    batch.update(others)
    return batch


def keep_batch(batch: dict) -> dict:
    """collate_fn for a dataset whose ``__getitems__`` already returns a batch: wraps it so that it
    leaves a worker process as one buffer."""
    return PackedBatch(batch)
