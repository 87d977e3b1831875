"""torch.compile as every stage and benchmark applies it."""

from __future__ import annotations

import functools
import sys

import torch
from torch import nn

# torch.compile's modes; the last two add CUDA graphs
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def compile_mode(cfg) -> str | None:
    """The torch.compile mode an ``eval`` or ``predict`` ``cfg`` asks for (``compile`` and
    ``compile_mode``), None for no compilation; a mode other than ``default`` compiles without
    ``compile=true``. An unknown mode is a one-line error."""
    mode = str(cfg.compile_mode or "default")
    if mode not in COMPILE_MODES:
        from forecast_peft.errors import UserError

        raise UserError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got '{mode}'")
    return mode if bool(cfg.compile) or mode != "default" else None


def uses_cuda_graphs(mode: str | None) -> bool:
    """Whether torch.compile's ``mode`` records CUDA graphs: the network's outputs then live in
    the graph's memory, which its next call overwrites, and each batch shape records a graph of
    its own (``collate_scenes(static=True)`` keeps the shapes few)."""
    return mode in CUDA_GRAPH_MODES


def compile_forward(fn, mode: str | None = None, **options):
    """``torch.compile(fn)`` for dynamic shapes from the start (every batch has its own numbers of
    scenes, actors and lanes), each size its own symbol. By default torch gives sizes that happen
    to be equal in the batch it traces one symbol ("duck shaping") and guards on their equality:
    a first batch of 30 scenes with 30 actor slots, or 50 actor slots like the 50 history steps,
    compiled the network again at the next batch (minutes each, and after 8 torch runs it
    uncompiled). ``mode``: torch.compile's (None or ``default`` for its default); ``options``:
    torch.compile's others (``backend``, ``fullgraph``)."""
    import torch.fx.experimental._config as shape_config

    compiled = torch.compile(fn, dynamic=True, mode=None if mode == "default" else mode, **options)

    @functools.wraps(fn)
    def forward(*args, **kwargs):
        with shape_config.patch(use_duck_shape=False):  # read when a call traces
            return compiled(*args, **kwargs)

    return forward


def maybe_compile(model: nn.Module, enabled: bool, mode: str | None = None) -> None:
    """Compile ``model.forward`` in place (``compile_forward``). Parameters and state-dict keys
    stay as they are, so checkpoints are the same with and without compilation. ``mode``:
    torch.compile's (``reduce-overhead`` adds CUDA graphs, recorded once per distinct batch shape)."""
    if enabled:
        model.forward = compile_forward(model.forward, mode)
        said = "compile=true" if mode in (None, "default") else f"compile_mode={mode}"
        graphs = "; each new batch shape records a CUDA graph" if uses_cuda_graphs(mode) else ""
        print(f"{said}: the first batch compiles the network (minutes), the others reuse it{graphs}", file=sys.stderr)


def fresh_cache_for(model_cfg: dict, mode: str | None, previous: str | None) -> str:
    """Before compiling the network of ``model_cfg`` and ``mode`` in a process that compiled
    ``previous``: networks of one kind share their compiled graphs, but torch.compile keeps at
    most 8 per function (``recompile_limit``) and runs the function eagerly once they are used
    up, so a sweep or an eval over several model sizes would run its later networks uncompiled.
    Another network than the one before starts from an empty cache. Returns this network's key,
    the next call's ``previous``."""
    network = repr((model_cfg, mode))
    if previous is not None and network != previous:
        torch.compiler.reset()
    return network


def compilations() -> int:
    """Graphs torch.compile has compiled in this process so far (Dynamo's count): a benchmark
    reports it, since a recompilation per batch shape would cost more than it measures."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def cudagraph_skips() -> int:
    """Graphs compiled for CUDA graphs that run without them (inductor's count: an input it
    cannot keep in the graph's memory, an operation on the CPU, ...) in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])
