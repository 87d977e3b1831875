"""Batches leave DataLoader workers in reused shared-memory buffers: the values must be those of
an in-process collate whether the consumer drops each batch at once or keeps them all."""

import gc
import multiprocessing
import os
import pickle
import shutil
import signal
import sys
from multiprocessing.reduction import ForkingPickler
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing  # noqa: F401  (registers the tensor reductions)
from torch.utils.data import DataLoader

from forecast_peft.data.batch import PackedBatch, keep_batch
from forecast_peft.data.datamodule import ForecastDataModule, workers_stopped
from forecast_peft.data.dataset import ForecastDataset, collate_scenes
from forecast_peft.errors import CacheChangedError


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == b[key].dtype and torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


def _data_settings(synth_root, **changes) -> SimpleNamespace:
    """The ``data`` settings a ForecastDataModule reads, over the synthetic set's cache, in process."""
    settings = {
        "cache_dir": str(synth_root / "cache"),
        "train_fraction": 1.0,
        "subset_seed": 0,
        "num_workers": 0,
        "batch_size": 4,
        "eval_batch_size": 3,
        "pin_memory": False,
        "shuffle": True,
        "eval_order": "size",
    }
    return SimpleNamespace(**{**settings, **changes})


def _reference(ds: ForecastDataset, batch_size: int) -> list[dict]:
    return [
        collate_scenes([ds[i] for i in range(s, min(s + batch_size, len(ds)))]) for s in range(0, len(ds), batch_size)
    ]


@pytest.mark.parametrize("keep", [False, True], ids=["drop-each", "keep-all"])
def test_worker_batches_equal_in_process_collate(synth_root, keep):
    ds = ForecastDataset(synth_root / "cache", "train")
    expected = _reference(ds, 3)
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=keep_batch, persistent_workers=True)
    kept = []
    for _epoch in range(3):  # later epochs run on reused buffers
        for i, batch in enumerate(loader):
            if keep:
                kept.append((i, batch))
            else:
                _assert_same(batch, expected[i])
            del batch
    for i, batch in kept:  # nothing a worker wrote later overwrote a batch still held
        _assert_same(batch, expected[i])


def test_a_pickled_dataset_holds_its_shard_folders_not_their_arrays(synth_root):
    """What a worker that forkserver or spawn starts receives: a few kB, not the split's arrays
    (the memory maps pickled as copies of them); it maps the shards again and reads the same
    scenes, of the same subset, with the same batch settings."""
    ds = ForecastDataset(synth_root / "cache", "train", fraction=0.5, seed=3)
    ds.slot_multiple = 8
    arrays = sum(a.nbytes for shard in ds.shards for a in shard.arrays.values())
    data = pickle.dumps(ds)
    assert len(data) < arrays / 50, (len(data), arrays)
    copy = pickle.loads(data)
    assert len(copy) == len(ds) == 12 and copy.slot_multiple == 8
    assert copy.scenario_ids() == ds.scenario_ids()
    for i in range(len(ds)):
        mine, theirs = ds[i], copy[i]
        assert mine.keys() == theirs.keys()
        assert all(np.array_equal(mine[key], theirs[key]) for key in mine), i


def test_loader_workers_start_from_a_fork_server_by_default(synth_root):
    """``data.worker_start=auto`` (and where the setting is missing, as in an older run's
    config): forkserver on Linux, not a fork of a process in which other threads run; the
    batches are those made in the process."""
    expected = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    loader = ForecastDataModule(_data_settings(synth_root, num_workers=2)).loader("val")
    assert loader.multiprocessing_context.get_start_method() == expected
    in_process = list(ForecastDataModule(_data_settings(synth_root)).loader("val"))
    batches = list(loader)
    assert len(batches) == len(in_process) > 1
    for batch, reference in zip(batches, in_process):
        _assert_same(batch, reference)
    for start in ("fork", "spawn", "forkserver"):
        settings = _data_settings(synth_root, num_workers=1, worker_start=start)
        assert ForecastDataModule(settings).loader("val").multiprocessing_context.get_start_method() == start


class _WorkerState(torch.utils.data.Dataset):
    """One item: whether the worker's process keeps freed memory (``runtime.keep_freed_memory``)
    and ignores the requeue signal."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> tuple[bool, bool]:
        from forecast_peft import runtime

        return runtime.freed_memory_kept(), signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN


def test_a_worker_from_the_fork_server_is_set_up_as_a_forked_one(synth_root, monkeypatch):
    """A forked worker inherits the main process's malloc setting; one that the fork server starts
    applies it itself where the main process did, and not where it did not. Both ignore the
    requeue signal, which is for the main process."""
    from forecast_peft import runtime

    monkeypatch.setattr(runtime, "_kept", None)
    applies = runtime.keep_freed_memory()  # this process's choice (False where the environment opts out)
    for kept in {False, applies}:
        monkeypatch.setattr(runtime, "_kept", kept)
        made = ForecastDataModule(_data_settings(synth_root, num_workers=1)).loader("val")
        probe = DataLoader(
            _WorkerState(),
            batch_size=None,
            num_workers=1,
            worker_init_fn=made.worker_init_fn,
            multiprocessing_context=made.multiprocessing_context,
        )
        assert tuple(next(iter(probe))) == (kept, True)


class _EndsItsWorker(torch.utils.data.Dataset):
    """Items whose reading ends the worker's process, by SIGKILL (as the system's out-of-memory
    killer does) or with exit code 3."""

    def __init__(self, how: str):
        self.how = how

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> int:
        import os

        if self.how == "SIGKILL":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(3)


# a worker from the fork server is found ended at the loader's 5 s check: one such case
@pytest.mark.parametrize("start, how", [("fork", "SIGKILL"), ("fork", "exit"), ("forkserver", "SIGKILL")])
def test_a_worker_that_ends_is_said_in_a_line_with_how_it_ended(start, how):
    """torch raises a paragraph, or (from a worker that the fork server started, not this
    process's child) only that the worker "exited unexpectedly": the line names the signal or the
    exit code either way, and for SIGKILL which settings need less memory."""
    from forecast_peft.data.datamodule import worker_context
    from forecast_peft.errors import lost_worker

    loader = DataLoader(
        _EndsItsWorker(how), num_workers=1, multiprocessing_context=worker_context(SimpleNamespace(worker_start=start))
    )
    with pytest.raises(RuntimeError) as raised:
        next(iter(loader))
    line = lost_worker(raised.value)
    assert line is not None and line.startswith("DataLoader worker (pid "), str(raised.value)
    if how == "SIGKILL":
        assert line.endswith(
            "was ended by SIGKILL (as the system's out-of-memory killer ends a process): "
            "fewer workers (data.num_workers) or smaller batches (data.batch_size) need less memory"
        )
    else:
        assert line.endswith(
            "exited with code 3: data.num_workers=0 reads the data in this process, where an error of its own shows"
        )


START_WORKER_SERVER = """
from types import SimpleNamespace
from forecast_peft.data.datamodule import worker_context
from forecast_peft.errors import UserError
try:
    worker_context(SimpleNamespace(worker_start="forkserver"))
except UserError as err:
    print(err)
"""


def test_a_temporary_folder_too_long_for_the_fork_server_s_socket_is_one_line(tmp_path):
    """The fork server's socket lies in the temporary folder, and a socket's path is at most 107
    characters: a job's long TMPDIR (a deep pytest folder: the GPU suite's test failed so) gave an
    OSError traceback; now a line that says what to set. In a fresh process: this one's fork server
    may be running already, and then no socket is made."""
    import subprocess

    long = tmp_path / ("t" * max(1, 90 - len(str(tmp_path))))
    long.mkdir()
    env = {**os.environ, "TMPDIR": str(long)}
    done = subprocess.run([sys.executable, "-c", START_WORKER_SERVER], capture_output=True, text=True, env=env)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == (
        f"the temporary folder {long} has too long a path for the socket of the DataLoader workers' fork server (a "
        "socket's path is at most 107 characters, with about 32 added): set TMPDIR to a shorter folder, such as "
        "/tmp, or data.worker_start=spawn\n"
    )


def test_a_worker_s_end_is_told_from_other_errors():
    """torch's words for a worker's end, each in a line; other errors are not one."""
    from forecast_peft.errors import lost_worker

    assert lost_worker(RuntimeError("DataLoader worker (pid 7) is killed by signal: Bus error. ")) == (
        "DataLoader worker (pid 7) was ended by SIGBUS: out of shared memory (/dev/shm), as a rule: "
        "give it more (docker --shm-size=2g) or use fewer workers"
    )
    assert lost_worker(RuntimeError("DataLoader worker (pid(s) 7, 8) exited unexpectedly")) == (
        "DataLoader worker (pid 7) ended: data.num_workers=0 reads the data in this process, where an error of its "
        "own shows"
    )  # no loader in the traceback: how is not known
    for other in (RuntimeError("CUDA error"), RuntimeError(""), ValueError("DataLoader worker (pid 7) exited")):
        assert lost_worker(other) is None


class _RaisesWhenFreed:
    """What Python cannot raise: an error in a finaliser (as in a fork's after-fork hook)."""

    def __init__(self, message: str):
        self.message = message

    def __del__(self):
        raise RuntimeError(self.message)


def test_a_worker_s_end_that_python_cannot_raise_is_left_to_the_loader(monkeypatch):
    """torch's handler raised a worker's end in logging's after-fork hook, where Python printed it
    as "Exception ignored in ..." with a traceback: each command leaves such an end to the loader,
    which finds it at its next check. Other unraisable errors reach the hook as before, and the
    hook is put back after."""
    from forecast_peft.errors import worker_ends_left_to_the_loader

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    with worker_ends_left_to_the_loader():
        _RaisesWhenFreed("DataLoader worker (pid 7) is killed by signal: Killed. ")
        _RaisesWhenFreed("DataLoader worker (pid(s) 7) exited unexpectedly")
        _RaisesWhenFreed("another failure")
    _RaisesWhenFreed("DataLoader worker (pid 8) is killed by signal: Killed. ")
    assert [str(u.exc_value) for u in seen] == [
        "another failure",
        "DataLoader worker (pid 8) is killed by signal: Killed. ",
    ]


@pytest.mark.parametrize("change", ["was written again", "was removed"])
def test_a_worker_that_finds_a_shard_changed_says_so_in_a_line(synth_root, tmp_path, change):
    """A shard written again (as preprocessing does: a new folder renamed into place) or removed
    after the run opened the cache: a worker that maps it again would read other scenes than the
    run's. The loader raises one line that names the shard, without the worker's traceback."""
    cache = shutil.copytree(synth_root / "cache", tmp_path / "cache")
    module = ForecastDataModule(_data_settings(synth_root, cache_dir=str(cache), num_workers=1))
    loader = module.loader("val")
    shard = module.dataset("val").shards[0].path
    if change == "was written again":
        shutil.copytree(shard, tmp_path / "new")
        shutil.rmtree(shard)
        (tmp_path / "new").rename(shard)
    else:
        shutil.rmtree(shard)
    with pytest.raises(CacheChangedError) as raised, workers_stopped(loader):
        next(iter(loader))
    message = str(raised.value)
    assert message.startswith(f"{shard}: this cache shard {change} after the run had opened it"), message
    assert "\n" not in message and message.endswith("run the command again once the cache is finished")


def test_a_loader_s_workers_end_with_the_block_that_failed(synth_root):
    """``workers_stopped``: the workers of a loader end with the block, also one that failed;
    left to the error's traceback, they lived on until a garbage collection, which waited 5 s for
    each (torch's own stop could no longer reach them by then)."""
    loader = ForecastDataModule(_data_settings(synth_root, num_workers=2)).loader("val")
    with pytest.raises(ValueError), workers_stopped(loader):
        batches = iter(loader)  # held here, as an error's traceback holds the iterator it failed in
        next(batches)
        assert len(multiprocessing.active_children()) == 2
        raise ValueError("a failure while the workers run")
    assert not multiprocessing.active_children() and loader._iterator is None
    del batches
    assert next(iter(loader))["x"].shape[0] == 3  # the loader starts new workers when iterated again
    with workers_stopped(loader):
        pass
    assert not multiprocessing.active_children()


def test_a_worker_found_ended_as_the_workers_stop_leaves_the_failure_on_its_way_up(synth_root):
    """torch's SIGCHLD handler raises a worker's end wherever the main process is, also in the
    stop of the workers (seen on a busy machine: the out-of-memory killer had ended two, and the
    second replaced the first one's line, which said how to resume, with one that did not). The
    failure on its way up stays the one raised, the workers end all the same, and an error of
    another kind from the stop is still raised."""
    loader = ForecastDataModule(_data_settings(synth_root, num_workers=2)).loader("val")
    for raised in ("DataLoader worker (pid 4321) is killed by signal: Killed. ", "some other failure"):
        with pytest.raises((ValueError, RuntimeError)) as caught, workers_stopped(loader):
            batches = iter(loader)
            next(batches)
            _raise_after_the_first_shutdown(batches, raised)
            raise ValueError("a failure while the workers run")
        assert str(caught.value) == ("a failure while the workers run" if "pid 4321" in raised else raised)
        assert not multiprocessing.active_children()
        del batches


def _raise_after_the_first_shutdown(iterator, message: str) -> None:
    """``iterator``'s stop of its workers raises ``message`` after its own, as torch's handler does
    (its ``finally`` ends the workers); once, not again from ``__del__``."""
    shutdown = iterator._shutdown_workers

    def then_raise():
        running = not iterator._shutdown
        shutdown()
        if running:
            raise RuntimeError(message)

    iterator._shutdown_workers = then_raise


def _send(batch: PackedBatch) -> dict:
    """What a worker's queue does: pickle with torch's reductions, unpickle on the other side."""
    return pickle.loads(ForkingPickler.dumps(batch))


def test_buffer_is_reused_only_after_the_consumer_drops_it(synth_root, monkeypatch):
    import forecast_peft.data.batch as batch_module

    monkeypatch.setattr(batch_module, "_POOL", None)
    specs = [("a", "float32", (4, 8)), ("b", "bool", (3,))]
    first = PackedBatch.allocate(specs, shared=True)
    first["a"].fill_(7.0)
    received = _send(first)
    ptr = first["a"].data_ptr()
    del first
    view = received["a"][1:]  # a view of a view keeps the buffer held too
    del received
    gc.collect()
    second = PackedBatch.allocate(specs, shared=True)
    assert second["a"].data_ptr() != ptr  # still held: a fresh buffer
    assert torch.equal(view, torch.full((3, 8), 7.0))
    del view, second
    gc.collect()
    third = PackedBatch.allocate(specs, shared=True)
    assert third["a"].data_ptr() == ptr  # released: reused, and zeroed
    assert not third["a"].any() and not third["b"].any()


def test_replaced_tensor_is_packed_by_copy():
    batch = PackedBatch.allocate([("a", "float32", (2, 2))], shared=True)
    batch["a"] = torch.arange(6.0)
    batch["extra"] = torch.ones(2, dtype=torch.int64)
    got = _send(batch)
    assert torch.equal(got["a"], torch.arange(6.0)) and torch.equal(got["extra"], torch.ones(2, dtype=torch.int64))


def test_padded_tokens_counts_the_batches_as_the_loader_cuts_them():
    from forecast_peft.data.dataset import padded_tokens

    actors, lanes = np.array([3, 1, 2, 5, 4]), np.array([10, 30, 20, 5, 1])
    # batches [0, 1] -> 2 x (2 * 3 + 30); [2, 3] -> 2 x (2 * 5 + 20); [4] -> 1 x (2 * 4 + 1)
    assert padded_tokens(np.arange(5), actors, lanes, 2) == 72 + 60 + 9
    # [3, 4] -> 2 x (2 * 5 + 5); [0, 2] -> 2 x (2 * 3 + 20); [1] -> 1 x (2 * 1 + 30)
    assert padded_tokens(np.array([3, 4, 0, 2, 1]), actors, lanes, 2) == 30 + 52 + 32
    assert padded_tokens(np.arange(0), actors, lanes, 2) == 0


def test_size_order_visits_every_scene_once(synth_root):
    from forecast_peft.data.dataset import SizeOrderedSampler, size_order

    ds = ForecastDataset(synth_root / "cache", "val")
    order = list(SizeOrderedSampler(ds, batch_size=3))
    assert sorted(order) == list(range(len(ds)))
    actors, lanes = ds.scene_sizes()
    assert all(len(ds[i]["positions"]) == actors[i] and len(ds[i]["lane_positions"]) == lanes[i] for i in order)
    assert order == size_order(actors, lanes, 3).tolist()


def test_size_order_pads_little_in_both_sizes():
    from forecast_peft.data.dataset import padded_tokens, size_order

    rng = np.random.default_rng(0)
    actors, lanes = rng.integers(20, 65, 128 * 64), rng.integers(60, 201, 128 * 64)  # AV2-sized
    real = (2 * actors + lanes).sum()
    order = size_order(actors, lanes, 128)
    assert sorted(order) == list(range(len(actors)))
    by_lanes = np.lexsort((-actors, -lanes))
    share = {
        name: real / padded_tokens(o, actors, lanes, 128)
        for name, o in [("grid", order), ("lanes", by_lanes), ("random", rng.permutation(len(actors)))]
    }
    assert share["grid"] > 0.93 and share["lanes"] < 0.87 and share["random"] < 0.72, share
    # sizes that go together (small suburban against large downtown scenes): lane order is
    # already good, and the grid never pads more than it
    actors = np.where(rng.random(len(lanes)) < 0.5, rng.integers(5, 15, len(lanes)), rng.integers(40, 65, len(lanes)))
    lanes = np.where(actors < 15, rng.integers(20, 60, len(lanes)), rng.integers(120, 201, len(lanes)))
    grid, by_lanes = size_order(actors, lanes, 32), np.lexsort((-actors, -lanes))
    assert padded_tokens(grid, actors, lanes, 32) <= padded_tokens(by_lanes, actors, lanes, 32)
    assert size_order(actors[:0], lanes[:0], 128).tolist() == []
    assert size_order(actors[:5], lanes[:5], 128).tolist() == sorted(range(5), key=lambda i: (-lanes[i], -actors[i]))


def test_evaluation_does_not_depend_on_batch_order(synth_root):
    from forecast_peft.data.datamodule import ForecastDataModule
    from forecast_peft.evaluation import constant_velocity, evaluate

    results = []
    for order in ("size", "dataset"):
        cfg = _data_settings(synth_root, eval_order=order)
        loader = ForecastDataModule(cfg).loader("val")
        first = next(iter(loader))["scenario_id"]
        results.append((first, *evaluate("cv", constant_velocity, loader, torch.device("cpu"), progress=False)))
    (first_size, row_size, frame_size), (first_data, row_data, frame_data) = results
    assert first_size != first_data  # the two orders really differ
    assert row_size.keys() == row_data.keys()
    for key, value in row_size.items():
        expected = row_data[key] if isinstance(value, str) else pytest.approx(row_data[key], rel=1e-12)
        assert value == expected, key
    assert frame_size.equals(frame_data)


def test_bucket_order_shuffles_batches_of_one_size(synth_root):
    from forecast_peft.data.dataset import BucketSampler, padded_tokens

    ds = ForecastDataset(synth_root / "cache", "train")  # 24 scenes
    actors, lanes = ds.scene_sizes()
    sampler = BucketSampler(ds, batch_size=5, bucket_batches=2, seed=3)

    epochs = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        batches = sampler.batches(np.random.default_rng([3, epoch]))
        order = list(sampler)
        assert sorted(order) == list(range(24))  # every scene once
        assert order == np.concatenate(batches).tolist()
        assert [len(b) for b in batches] == [5, 5, 5, 5, 4]  # the short batch last: boundaries kept
        for b in batches:  # cut from a bucket in lane order or from a stratum in actor order
            by_lanes = sorted(b, key=lambda i: (-lanes[i], -actors[i]))
            assert list(b) in (by_lanes, sorted(b, key=lambda i: (-actors[i], -lanes[i])))
        epochs.append(order)
    assert len({tuple(o) for o in epochs}) == 4  # a new order each epoch
    sampler.set_epoch(2)
    assert list(sampler) == epochs[2] and list(sampler) == epochs[3]  # seeded; a pass moves the epoch on
    rng = np.random.default_rng(0)
    random_pad = np.mean([padded_tokens(rng.permutation(24), actors, lanes, 5) for _ in range(50)])
    assert np.mean([padded_tokens(np.array(o), actors, lanes, 5) for o in epochs]) < random_pad


@pytest.mark.parametrize("bucketed", [False, True])
@pytest.mark.parametrize("processes", [2, 3])
def test_training_orders_are_shared_out_by_whole_batches(synth_root, bucketed, processes):
    """The training order is the seed's and the epoch's. In a multi-process fit each process
    takes every n-th of its batches (the first ones again where they do not divide evenly): the
    processes run as many steps, together cover every scene, and keep the batches whole (a
    bucketed batch stays of one size; Lightning's own distributed wrapper shuffled the scenes again)."""
    from forecast_peft.data.dataset import BucketSampler, EpochSampler

    ds = ForecastDataset(synth_root / "cache", "train")  # 24 scenes: batches of 5, 5, 5, 5, 4

    def sampler(**kw):
        return BucketSampler(ds, 5, bucket_batches=2, seed=3, **kw) if bucketed else EpochSampler(24, 5, seed=3, **kw)

    for epoch in (0, 4):
        one = sampler(epoch=epoch)
        whole = list(one)
        batches = [tuple(whole[i : i + 5]) for i in range(0, 24, 5)]
        assert sorted(whole) == list(range(24)) and len(one) == 24
        assert whole == list(sampler(epoch=epoch)) != list(sampler(epoch=epoch + 1))  # seeded by the epoch
        shares = []
        for rank in range(processes):
            share = sampler(epoch=epoch, num_replicas=processes, rank=rank)
            order = list(share)
            assert len(share) == len(order)
            shares.append([tuple(order[i : i + 5]) for i in range(0, len(order), 5)])
        assert len({len(s) for s in shares}) == 1  # as many steps in every process
        assert set(sum(shares, [])) == set(batches)  # whole batches, every one of them
    assert isinstance(sampler(), torch.utils.data.DistributedSampler)  # so Lightning does not wrap it


def test_train_order_bucket_in_the_loader(synth_root):
    from forecast_peft.data.datamodule import ForecastDataModule
    from forecast_peft.errors import UserError

    data = _data_settings(synth_root, eval_batch_size=4, train_order="bucket")
    dm = ForecastDataModule(data)
    ids = [sid for batch in dm.loader("train", shuffle=True) for sid in batch["scenario_id"]]
    assert sorted(ids) == sorted(dm.dataset("train").scenario_ids())
    data.train_order = "sorted"
    with pytest.raises(UserError, match="data.train_order must be one of random, bucket, got 'sorted'"):
        dm.loader("train", shuffle=True)


@pytest.mark.parametrize("multiple", [1, 8, 5])
def test_the_loader_rounds_slots_up_to_data_slot_multiple(synth_root, multiple):
    """Every batch of every loader has its actor and lane slots rounded up to a multiple of
    ``data.slot_multiple`` (the conf default, ``SLOT_MULTIPLE``, where the setting is absent), and
    the same scenes; a bad value stops in one line."""
    from forecast_peft import config
    from forecast_peft.data.datamodule import ForecastDataModule
    from forecast_peft.data.dataset import SLOT_MULTIPLE
    from forecast_peft.errors import UserError

    assert config.compose("eval", []).data.slot_multiple == SLOT_MULTIPLE
    data = _data_settings(synth_root, slot_multiple=multiple)
    unrounded = set()
    for split, shuffle in (("train", True), ("val", False)):
        dm = ForecastDataModule(data)
        ids = []
        for batch in dm.loader(split, shuffle=shuffle):
            n, m = batch["x_key_padding_mask"].shape[1], batch["lane_key_padding_mask"].shape[1]
            assert n % multiple == 0 and m % multiple == 0, (split, n, m)
            real_n = int((~batch["x_key_padding_mask"]).sum(1).max())
            real_m = int((~batch["lane_key_padding_mask"]).sum(1).max())
            assert real_n <= n < real_n + multiple and real_m <= m < real_m + multiple
            unrounded.add((real_n, real_m) == (n, m))
            ids += batch["scenario_id"]
        assert sorted(ids) == sorted(dm.dataset(split).scenario_ids())
    assert (False in unrounded) == (multiple > 1)  # some batch had sizes that needed rounding
    del data.slot_multiple
    assert ForecastDataModule(data).dataset("val").slot_multiple == SLOT_MULTIPLE
    data.slot_multiple = 0
    with pytest.raises(UserError, match="data.slot_multiple must be a whole number of at least 1, got '0'"):
        ForecastDataModule(data).dataset("val")
