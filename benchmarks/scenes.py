"""AV2-sized random scenes in the cache's storage form (numpy only: runs where av2 and hydra are
not installed, such as the GPU machine). 20-64 actors and 60-200 lanes per scene, tracks that
start late or end early, as the benchmark issue specifies."""

from __future__ import annotations

import argparse

import numpy as np

from forecast_peft.constants import CURRENT_STEP, LANE_POINTS, TOTAL_STEPS
from forecast_peft.data.dataset import SLOT_MULTIPLE, collate_scenes, size_order


def random_scene(rng: np.random.Generator, index: int) -> dict:
    a = int(rng.integers(20, 65))
    m = int(rng.integers(60, 201))
    t = np.arange(TOTAL_STEPS) * 0.1
    speed = rng.uniform(0, 15, size=(a, 1))
    yaw = rng.uniform(-np.pi, np.pi, size=(a, 1))
    turn = rng.normal(0, 0.05, size=(a, 1))
    start = rng.uniform(-80, 80, size=(a, 1, 2))
    start[0] = 0.0
    ang = yaw + turn * t[None]
    steps = np.stack([np.cos(ang), np.sin(ang)], -1) * speed[..., None] * 0.1
    pos = (start + np.cumsum(steps, axis=1) - steps[:, CURRENT_STEP : CURRENT_STEP + 1]).astype(np.float32)
    pad = np.zeros((a, TOTAL_STEPS), bool)
    first = rng.integers(0, 40, size=a) * (rng.random(a) < 0.3)
    last = np.where(rng.random(a) < 0.3, rng.integers(60, TOTAL_STEPS, size=a), TOTAL_STEPS)
    pad |= (np.arange(TOTAL_STEPS)[None] < first[:, None]) | (np.arange(TOTAL_STEPS)[None] >= last[:, None])
    pad[0] = False
    pos[pad] = 0.0
    lanes = (
        rng.uniform(-150, 150, size=(m, 1, 2)) + np.cumsum(rng.normal(0, 1.5, size=(m, LANE_POINTS, 2)), 1)
    ).astype(np.float32)
    lane_pad = np.abs(lanes).max(-1) > 150
    lanes[lane_pad] = 0.0
    attr = np.zeros((a, 3), np.uint8)
    attr[:, 0] = rng.integers(0, 5, size=a)
    attr[:, 2] = rng.integers(0, 4, size=a)
    return {
        "positions": pos,
        "x_angles": ang.astype(np.float32) * ~pad,
        "x_velocity": np.repeat(speed, TOTAL_STEPS, 1).astype(np.float32),
        "x_padding_mask": pad,
        "x_attr": attr,
        "lane_positions": lanes,
        "lane_centers": lanes[:, 9:11].mean(1),
        "lane_angles": rng.uniform(-np.pi, np.pi, m).astype(np.float32),
        "lane_attr": np.zeros((m, 3), np.float32),
        "lane_padding_mask": lane_pad,
        "is_intersections": np.zeros(m, np.float32),
        "origin": np.zeros((1, 2), np.float32),
        "theta": np.float32(0.0),
        "scenario_id": f"bench-{index:06d}",
        "track_id": "0",
        "city": "bench",
    }


def random_batch(batch_size: int, seed: int = 0, static: bool = False, slot_multiple: int = SLOT_MULTIPLE) -> dict:
    """A batch of ``batch_size`` random scenes, as the loader collates them; ``static``: in the
    fixed shapes CUDA graphs need (``collate_scenes(static=True)``); ``slot_multiple``: as
    ``data.slot_multiple`` (its default)."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, i) for i in range(batch_size)]
    return collate_scenes(scenes, static=static, slot_multiple=slot_multiple)


def size_ordered_batches(
    batch_size: int, num_batches: int, seed: int = 0, static: bool = False, slot_multiple: int = SLOT_MULTIPLE
) -> list[dict]:
    """``num_batches`` batches cut from a pool of random scenes in ``size_order`` (the order of
    ``SizeOrderedSampler``, used by evaluation and prediction); ``static`` and ``slot_multiple``
    as in ``random_batch``."""
    rng = np.random.default_rng(seed)
    pool = [random_scene(rng, i) for i in range(batch_size * num_batches)]
    actors = np.array([len(s["positions"]) for s in pool])
    lanes = np.array([len(s["lane_positions"]) for s in pool])
    order = size_order(actors, lanes, batch_size)
    cuts = range(0, len(order), batch_size)
    return [
        collate_scenes([pool[i] for i in order[k : k + batch_size]], static=static, slot_multiple=slot_multiple)
        for k in cuts
    ]


def add_slot_multiple_option(parser: argparse.ArgumentParser) -> None:
    """``--slot-multiple``: a batch's actor and lane slots rounded up as ``data.slot_multiple``
    rounds them (its default), for the scripts that collate batches."""
    parser.add_argument(
        "--slot-multiple",
        type=int,
        default=SLOT_MULTIPLE,
        help="a batch's actor and lane slots rounded up to a multiple of this, as data.slot_multiple "
        "(1: no rounding, each size-ordered batch a shape of its own)",
    )
