"""LightningDataModule over the packed cache."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from multiprocessing import forkserver, resource_tracker
from typing import TYPE_CHECKING

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from forecast_peft.data import check_choices
from forecast_peft.data.batch import keep_batch
from forecast_peft.data.dataset import (
    SLOT_MULTIPLE,
    BucketSampler,
    EpochSampler,
    ForecastDataset,
    SizeOrderedSampler,
    start_worker,
)
from forecast_peft.data.scenario_list import ScenarioList
from forecast_peft.errors import ConfigError, UserError, lost_worker
from forecast_peft.runtime import freed_memory_kept, refuse_unguarded_script
from forecast_peft.slurm import requeue_signal_blocked

if TYPE_CHECKING:
    from omegaconf import DictConfig


def slot_multiple(data) -> int:
    """``data.slot_multiple`` (its default where the config lacks it): a positive whole number,
    else a one-line error."""
    value = getattr(data, "slot_multiple", SLOT_MULTIPLE)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"data.slot_multiple must be a whole number of at least 1, got '{value}'")
    return value


# what a DataLoader worker that forkserver starts needs, imported once in the fork server, so that
# each worker forks with it (the dataset, its collate and ``start_worker``)
WORKER_MODULES = ["forecast_peft.data.dataset"]


def worker_context(data):
    """How DataLoader workers start (``data.worker_start``): ``auto`` is forkserver where the
    platform has it (Linux, macOS), else spawn. A worker forked from a training process, as torch
    does by default on Linux, copies a process in which other threads run (the other loader's
    workers' queue threads, gloo's in a multi-process fit, the pin-memory thread), and may start
    with a lock that one of them held: one of a two-process fit's validation workers, forked in
    the sanity check, waited on one for ever (2 of 74 runs on a busy 2-core machine). forkserver
    forks workers from a clean process that has only imported ``WORKER_MODULES``; ``fork``
    stays a choice (workers start at once; a script that calls fpeft need not guard its code with
    ``if __name__ == "__main__":``, which forkserver and spawn run again in each worker)."""
    check_choices(data)
    method = getattr(data, "worker_start", None) or "auto"
    have = multiprocessing.get_all_start_methods()
    if method == "auto":
        method = "forkserver" if "forkserver" in have else "spawn"
    if method not in have:
        raise ConfigError(f"data.worker_start={method}: this platform starts processes only by {', '.join(have)}")
    context = multiprocessing.get_context(method)
    if method == "fork":
        return context
    refuse_unguarded_script(f"DataLoader workers ({method})", "set data.worker_start=fork")
    if method == "forkserver":  # takes effect where the server is not running yet
        context.set_forkserver_preload(WORKER_MODULES)
    try:
        with requeue_signal_blocked():  # the processes that start the workers and track their semaphores
            (forkserver.ensure_running if method == "forkserver" else resource_tracker.ensure_running)()
    except OSError as err:  # the fork server's socket lies in the temporary folder (a job's TMPDIR)
        if "AF_UNIX path too long" not in str(err):
            raise
        import tempfile

        raise UserError(
            f"the temporary folder {tempfile.gettempdir()} has too long a path for the socket of the DataLoader "
            "workers' fork server (a socket's path is at most 107 characters, with about 32 added): set TMPDIR "
            "to a shorter folder, such as /tmp, or data.worker_start=spawn"
        ) from None
    return context


def start_worker_server(data) -> None:
    """What ``data``'s DataLoader workers start from, started now, at the start of a stage (where
    ``data.num_workers`` asks for workers): the fork server then imports torch (about 1 s) while
    the stage loads its network, not while its first loader waits; and a script that would run
    again in each worker fails before any work (``worker_context``)."""
    if int(getattr(data, "num_workers", 0) or 0) > 0:
        worker_context(data)


def stop_workers(loader: DataLoader) -> None:
    """End the workers of ``loader``'s iterator now (its workers persist between passes). torch
    ends them when the iterator is freed; one that an error's traceback holds is freed later by
    the garbage collector, which closes its queues first: the workers then wait for a stop that
    never comes, and the collection waits 5 s for each before killing it (their memory held until
    then). Lightning ends the workers of the loaders it fits with as this does.

    A worker found ended while they stop is no error of its own: torch's SIGCHLD handler raises
    its end wherever the main process is, here too, where the work is done or a failure is on its
    way up, which it would replace (two workers that the out-of-memory killer ended: the line of
    the first one lost its way to resume). torch's shutdown ends the others in its ``finally``."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is None:  # no pass made, or not a torch DataLoader
        return
    if hasattr(iterator, "_shutdown_workers"):  # (an iterator without workers has nothing to end)
        try:
            iterator._shutdown_workers()
        except RuntimeError as err:
            if lost_worker(err) is None:
                raise
    loader._iterator = None


@contextmanager
def workers_stopped(loader: DataLoader) -> Iterator[DataLoader]:
    """``loader``, whose workers end when the block does, whether it finished or failed."""
    try:
        yield loader
    finally:
        stop_workers(loader)


class ForecastDataModule(pl.LightningDataModule):
    """Train/val/test loaders of the cache at ``data.cache_dir``; batches are padded dicts."""

    def __init__(
        self, data: DictConfig, seed: int = 0, static_shapes: bool = False, scenarios: ScenarioList | None = None
    ):
        """``data``: the ``data`` config node (or any object with the same attributes); ``seed``:
        the run's, which with the epoch fixes the training order (``EpochSampler``);
        ``static_shapes``: batches in a few fixed shapes, for CUDA graphs
        (``collate_scenes(static=True)``); ``scenarios``: only these (eval's and viz's
        ``--scenarios FILE``)."""
        super().__init__()
        self.cfg = data
        self.scenarios = scenarios
        self.seed = int(seed)
        self.static_shapes = static_shapes
        # the epoch the training loader starts in: a resumed fit's (``training.fit`` sets it).
        # Lightning makes the loader's iterator, which with workers draws the first indices, while
        # it sets up the optimiser, before it restores the checkpoint's epoch and calls set_epoch
        self.start_epoch = 0
        self.datasets: dict[str, ForecastDataset] = {}

    def dataset(self, split: str) -> ForecastDataset:
        if split not in self.datasets:
            fraction = self.cfg.train_fraction if split == "train" else 1.0
            cities = getattr(self.cfg, "cities", None) or ()
            self.datasets[split] = ForecastDataset(
                self.cfg.cache_dir, split, fraction, self.cfg.subset_seed, cities, self.scenarios
            )
            self.datasets[split].static_shapes = self.static_shapes
            self.datasets[split].slot_multiple = slot_multiple(self.cfg)
        return self.datasets[split]

    def loader(self, split: str, shuffle: bool = False, batch_size: int | None = None) -> DataLoader:
        """Batches of ``split``; unshuffled ones hold scenes of about one size when
        ``data.eval_order`` is ``size`` (less padding; metrics and predictions are per scene, so
        the order is free)."""
        workers = int(self.cfg.num_workers)
        dataset = self.dataset(split)
        check_choices(self.cfg)
        order = getattr(self.cfg, "eval_order", "dataset")
        batch_size = batch_size or (self.cfg.batch_size if split == "train" else self.cfg.eval_batch_size)
        train_order = getattr(self.cfg, "train_order", "random")
        sampler = SizeOrderedSampler(dataset, batch_size) if order == "size" and not shuffle else None
        if shuffle:  # an order fixed by the seed and the epoch, so that a resumed run draws the same
            epoch = self.start_epoch
            if train_order == "bucket":
                sampler = BucketSampler(dataset, batch_size, seed=self.seed, epoch=epoch)
            else:
                sampler = EpochSampler(len(dataset), batch_size, seed=self.seed, epoch=epoch)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            # the loader's own generator: making an iterator then draws its workers' base seed
            # from it, not from the global random state that the training steps draw from
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=workers,
            collate_fn=keep_batch,
            pin_memory=bool(self.cfg.pin_memory) and torch.cuda.is_available(),
            persistent_workers=workers > 0,
            worker_init_fn=partial(start_worker, keep_memory=freed_memory_kept()) if workers > 0 else None,
            multiprocessing_context=worker_context(self.cfg) if workers > 0 else None,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", shuffle=bool(self.cfg.shuffle))

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")
