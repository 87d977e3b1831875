"""torch.compile as every stage and benchmark applies it."""

from __future__ import annotations

import functools
import os
import sys
import traceback

import torch
from torch import nn

from forecast_peft.errors import CompileError, StorageError, Terminated, UserError
from forecast_peft.models.choices import AUTOTUNE_MODES, uses_cuda_graphs


def mode_on(mode: str | None, device_type: str) -> str | None:
    """The mode to compile in on ``device_type``: the modes that tune kernels compile as the
    default one off a GPU, with a note. On the CPU, inductor's matrix-product templates are tuned
    for the sizes of the first batch and fail at the next batch's (torch 2.13: `fpeft eval
    compile_mode=max-autotune-no-cudagraphs` failed at its second batch, in tuning and in
    evaluation)."""
    if mode in AUTOTUNE_MODES and device_type != "cuda":
        print(
            f"note: compile_mode={mode} tunes GPU kernels; on {device_type} it compiles as compile=true "
            "(inductor's CPU templates, tuned at the first batch's sizes, fail at the next batch's)",
            file=sys.stderr,
        )
        return "default"
    return mode


def training_device_type(trainer_cfg) -> str:
    """The device type a training stage's ``trainer`` settings put the network on."""
    accelerator = str(trainer_cfg.get("accelerator") or "auto")
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu" if accelerator == "auto" else accelerator


def inductor_options(mode: str | None) -> dict:
    """Inductor's settings for ``mode`` (torch.compile's own for it) with those every compilation
    of fpeft's takes. Off: inductor's memory-coalescing tiling analysis, which torch's config
    says "does not yet apply to dynamic shapes": on an H200 with torch 2.11 it asserted
    (``tiling_utils.get_pw_red_splits``) while compiling a published-size PEFT training step with
    dynamic shapes, and the step never ran (session 26); with it off, inductor tiles its GPU
    kernels by its other rules."""
    import torch._inductor.config as inductor_config
    from torch._inductor import list_mode_options

    options = dict(list_mode_options(mode or "default", dynamic=True))
    if hasattr(inductor_config.triton, "coalesce_tiling_analysis"):
        options["triton.coalesce_tiling_analysis"] = False
    return options


def compile_forward(fn, mode: str | None = None, **options):
    """``torch.compile(fn)`` for dynamic shapes from the start (every batch has its own numbers of
    scenes, actors and lanes), each size its own symbol. By default torch gives sizes that happen
    to be equal in the batch it traces one symbol ("duck shaping") and guards on their equality:
    a first batch of 30 scenes with 30 actor slots, or 50 actor slots like the 50 history steps,
    compiled the network again at the next batch (minutes each, and after 8 torch runs it
    uncompiled). Python floats are specialised (``forward``'s comment). ``mode``: torch.compile's
    (None or ``default`` for its default); ``options``: torch.compile's others (``backend``,
    ``fullgraph``)."""
    import torch.fx.experimental._config as shape_config

    if options.get("backend", "inductor") == "inductor":  # the mode's settings and ours
        compiled = torch.compile(fn, dynamic=True, options=inductor_options(mode), **options)
    else:
        compiled = torch.compile(fn, dynamic=True, mode=None if mode == "default" else mode, **options)

    @functools.wraps(fn)
    def forward(*args, **kwargs):
        # read when a call traces: no duck shaping, and the modules' float settings (LayerNorm's
        # eps, DropPath's rate) as the constants they are; left as symbols, Dynamo failed to turn
        # them into tensors at the end of the trace and traced the whole network a second time
        with shape_config.patch(use_duck_shape=False), torch._dynamo.config.patch(specialize_float=True):
            try:
                return compiled(*args, **kwargs)
            except Exception as err:
                if not failed_in_compiler(err):
                    raise
                raise CompileError(compile_failure_line(err, mode)) from err

    return forward


def failed_in_compiler(err: BaseException) -> bool:
    """Whether ``err`` came from torch.compile itself (Dynamo's and inductor's own errors, or code
    inductor generated) rather than from the network's own code, the device's memory or a
    user-facing error of fpeft's."""
    from torch._dynamo.exc import TorchDynamoException, TorchRuntimeError

    # TorchRuntimeError: an operation of the network's own failed on the traced (fake) inputs, as it
    # would run eagerly
    if isinstance(err, (torch.OutOfMemoryError, UserError, Terminated, StorageError, TorchRuntimeError)):
        return False
    if isinstance(err, TorchDynamoException):
        return True
    frames = traceback.extract_tb(err.__traceback__)
    return any("torchinductor" in f.filename or f"torch{os.sep}_inductor{os.sep}" in f.filename for f in frames)


def compile_failure_line(err: BaseException, mode: str | None) -> str:
    """``err`` of torch.compile in one line, with what to do instead."""
    err = getattr(err, "inner_exception", None) or err  # BackendCompilerFailed: what the backend raised
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    said = lines[0] if lines else ""
    said = said if len(said) <= 300 else said[:297] + "..."
    how = "compile=true" if mode in (None, "default") else f"compile_mode={mode}"
    other = "" if mode in (None, "default") else ", or compile=true alone in the default mode"
    return (
        f"the network compiled with {how} failed in torch.compile ({type(err).__name__}: {said}); "
        f"compile=false runs it uncompiled{other}"
    )


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
