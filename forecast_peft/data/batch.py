"""Batches that leave DataLoader workers as one reused shared-memory buffer.

A batch of 32 AV2-sized scenes is about 7 MB. Moving it from a worker to the main process the
usual way costs a fresh shared-memory segment per tensor, and every fresh page of shared memory
is a page fault: on a 2-core machine that is more time than building the batch. Here every
tensor of a batch is a view into ONE buffer, and each worker keeps a small pool of such buffers
and reuses one as soon as the main process has dropped every tensor of the batch it carried.

The hand-back works without any message: byte 0 of a buffer is 1 while a batch in it is out,
and the main process's views keep one Python object alive whose finalizer sets the byte back
to 0 when the last view dies. The worker only reuses buffers whose byte reads 0; when none is
free (the consumer keeps batches) it falls back to a fresh buffer.
"""

from __future__ import annotations

import os
import shutil
import weakref

import numpy as np
import torch

from forecast_peft.errors import SharedMemoryError

HEADER = 64  # bytes before the first tensor; byte 0 is the "held by the consumer" flag
ALIGN = 64
POOL_SIZE = 8  # buffers per worker: the loader's prefetch plus the batches being consumed
HEADROOM = 1.25  # a new pooled buffer is this much larger than its first batch


class PackedBatch(dict):
    """A batch dict whose tensors are views into one buffer (``PackedBatch.allocate``), so that
    it pickles as one shared-memory handle. Tensors replaced or added after ``allocate`` are
    packed by a copy into a fresh buffer instead; the receiving side gets a plain dict."""

    _buffer: torch.Tensor | None = None
    _layout: tuple = ()

    @classmethod
    def allocate(cls, specs: list[tuple[str, type, tuple]], shared: bool) -> PackedBatch:
        """Zero-filled tensors for ``specs`` = [(key, numpy dtype, shape)] in one buffer: a pooled
        shared-memory one when ``shared`` (in a DataLoader worker), else ordinary memory."""
        layout, offset = _plan(
            [(key, torch.from_numpy(np.empty(0, dtype)).dtype, shape) for key, dtype, shape in specs]
        )
        if shared:
            buffer = _worker_pool().take(offset)
        else:
            buffer = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage(offset))
        buffer[1:offset].zero_()
        batch = cls(_views(buffer, layout))
        batch._buffer, batch._layout = buffer, tuple(layout)
        return batch

    def __reduce__(self):
        tensors = {k: v for k, v in self.items() if isinstance(v, torch.Tensor)}
        others = {k: v for k, v in self.items() if not isinstance(v, torch.Tensor)}
        if self._buffer is not None and self._buffer.is_shared() and self._intact(tensors):
            return _receive, (self._buffer, list(self._layout), others)
        layout, offset = _plan([(key, value.dtype, value.shape) for key, value in tensors.items()])
        buffer = torch.empty(0, dtype=torch.uint8).set_(_shared_storage(offset))
        for (_, start, _, _), value in zip(layout, tensors.values()):
            flat = value.contiguous().view(-1).view(torch.uint8)
            buffer[start : start + flat.numel()].copy_(flat)
        return _receive, (buffer, layout, others)

    def _intact(self, tensors: dict) -> bool:
        """Whether the tensors are still exactly the buffer's views (none replaced or added)."""
        if len(tensors) != len(self._layout):
            return False
        base = self._buffer.data_ptr()
        for key, start, dtype, shape in self._layout:
            t = tensors.get(key)
            if t is None or t.dtype != dtype or tuple(t.shape) != shape or t.data_ptr() != base + start:
                return False
        return True


class _Pool:
    """One worker's shared-memory buffers (uint8 tensors), reused once their flag reads 0."""

    def __init__(self, size: int = POOL_SIZE):
        self.size = size
        self.buffers: list[torch.Tensor] = []

    def take(self, nbytes: int) -> torch.Tensor:
        free = [i for i, b in enumerate(self.buffers) if int(b[0]) == 0]
        fits = [i for i in free if self.buffers[i].numel() >= nbytes]
        if fits:
            buffer = self.buffers[min(fits, key=lambda i: self.buffers[i].numel())]
        else:
            buffer = _new_buffer(_aligned(int(nbytes * HEADROOM)))
            if len(self.buffers) < self.size:
                self.buffers.append(buffer)
            elif free:  # every free one is too small: replace the smallest
                self.buffers[min(free, key=lambda i: self.buffers[i].numel())] = buffer
        buffer[0] = 1
        return buffer[:nbytes]


_POOL: tuple[int, _Pool] | None = None


def _worker_pool() -> _Pool:
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():  # a forked child starts its own
        _POOL = (os.getpid(), _Pool())
    return _POOL[1]


def _new_buffer(nbytes: int) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8).set_(_shared_storage(nbytes))


def _shared_storage(size: int) -> torch.UntypedStorage:
    """Storage allocated in shared memory from the start: pickling it sends a handle, without
    the copy of moving an ordinary buffer into shared memory."""
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
    try:
        return new_shared(size) if new_shared is not None else torch.UntypedStorage(size).share_memory_()
    except RuntimeError as err:  # torch: "unable to allocate shared memory(shm) ...: No space left on device (28)"
        if "No space left on device" not in str(err):
            raise
        raise SharedMemoryError(out_of_shared_memory(size)) from None


def out_of_shared_memory(size: int, folder: str = "/dev/shm") -> str:
    """Why a batch of ``size`` bytes found no shared memory, and what to do, in a line."""
    try:
        usage = shutil.disk_usage(folder)
        room = f"; {folder}: {usage.free / 1e6:.0f} of {usage.total / 1e6:.0f} MB free"
    except OSError:
        room = ""
    return (
        f"out of shared memory for a batch of the DataLoader workers ({size / 1e6:.1f} MB{room}): give the "
        "machine or container more (docker run --shm-size=2g), or lower data.num_workers (0 builds the "
        "batches in the main process, without shared memory) or the batch size"
    )


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _nbytes(dtype: torch.dtype, shape: tuple) -> int:
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def _plan(entries: list[tuple[str, torch.dtype, tuple]]) -> tuple[list, int]:
    """Layout [(key, byte offset, dtype, shape)] of tensors packed one after another (aligned)
    behind the header, and the buffer size it needs."""
    layout, offset = [], HEADER
    for key, dtype, shape in entries:
        layout.append((key, offset, dtype, tuple(shape)))
        offset += _aligned(_nbytes(dtype, shape))
    return layout, offset


def _views(buffer: torch.Tensor, layout: list) -> dict:
    return {
        key: buffer[start : start + _nbytes(dtype, shape)].view(dtype).view(shape)
        for key, start, dtype, shape in layout
    }


def _receive(buffer: torch.Tensor, layout: list, others: dict) -> dict:
    """Unpickling in the consumer: views into ``buffer`` that set its flag back to 0 (free for
    the worker to reuse) once the last of them is gone."""
    holder = buffer.numpy()  # its death marks the release
    tracked = torch.frombuffer(holder, dtype=torch.uint8)  # every view's storage keeps holder alive
    weakref.finalize(holder, _release, buffer)
    batch = _views(tracked, layout)
    batch.update(others)
    return batch


def _release(buffer: torch.Tensor) -> None:
    buffer[0] = 0


def keep_batch(batch: dict) -> dict:
    """collate_fn for a dataset whose ``__getitems__`` already returns a batch: makes sure that it
    leaves a worker process as one buffer."""
    return batch if isinstance(batch, PackedBatch) else PackedBatch(batch)
