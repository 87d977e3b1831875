"""Finds the operations that would make the host wait for a GPU, on any device (the CPU in CI).

On a GPU these stall the CPU until every queued kernel has run, so the next step's kernels are
not queued while the GPU works: reading a value back (``.item()``, ``bool(t)``, ``float(t)``),
operations whose output size depends on the data (``nonzero``, boolean-mask indexing,
``masked_select``, ``unique``, ``repeat_interleave`` without an output size), and tensors built
from host data inside a step (``torch.tensor([...], device=...)``: a blocking host-to-device
copy). ``HostSyncs`` records every such operation run under it, with the forward, the loss and
the backward included.
"""

from __future__ import annotations

import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# operations that always read data back or size their output from the data
SYNCING = {
    aten._local_scalar_dense,  # .item(), bool(), int(), float() of a tensor
    aten.nonzero,
    aten.masked_select,
    aten.equal,
    aten.is_nonzero,
    aten._unique,
    aten._unique2,
    aten.unique_dim,
    aten.unique_consecutive,
    aten.bincount,
    aten.lift_fresh,  # torch.tensor(data): built on the host, copied with a blocking copy
    aten.lift_fresh_copy,
}
INDEXING = {aten.index, aten.index_put, aten.index_put_}


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


def _caller() -> str:
    """The innermost frame of the project's code (or of the test) that ran the operation."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        if "forecast_peft" in frame.filename or "/tests/test_" in frame.filename:
            return f"{frame.filename.rsplit('/', 2)[-1]}:{frame.lineno}"
    return "?"


class HostSyncs(TorchDispatchMode):
    """Records the host-synchronising operations run under it in ``self.found`` (names) and
    ``self.where`` (the line of the project's code that ran each)."""

    def __init__(self, ignore: tuple[str, ...] = ()):
        """``ignore``: path fragments of code whose reads are left out (the optimisers' step
        counters, say, which stay on the host when the model is on a GPU)."""
        super().__init__()
        self.ignore = ignore
        self.found: list[str] = []
        self.where: list[str] = []

    def _record(self, name: str) -> None:
        if self.ignore and any(i in f.filename for f in traceback.extract_stack() for i in self.ignore):
            return
        self.found.append(name)
        self.where.append(f"{name} at {_caller()}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in SYNCING:
            self._record(packet.__name__)
        elif packet in INDEXING and _bool_index(args):
            self._record(f"{packet.__name__} with a boolean mask")
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self._record("repeat_interleave without output_size")
        return func(*args, **kwargs)
