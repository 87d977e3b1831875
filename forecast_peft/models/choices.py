"""The choices of a run's network settings (``compile_mode``, ``attention_kernel``) and their
checks, without torch: the configuration checks run them before any import of it, so that a
mistake in a command is answered at once."""

from __future__ import annotations

from forecast_peft.errors import ConfigError

# torch.compile's modes; the last two add CUDA graphs
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
AUTOTUNE_MODES = ("max-autotune-no-cudagraphs", "max-autotune")


def compile_mode(cfg, training: bool = False) -> str | None:
    """The torch.compile mode a stage's ``cfg`` asks for (``compile`` and ``compile_mode``), None
    for no compilation; a mode other than ``default`` compiles without ``compile=true``. An
    unknown mode is a one-line error, and so is a mode that records CUDA graphs for ``training``:
    every training batch has its own shapes (actor and lane slots, the real tokens the blocks
    run on, the masks), so each step would record a graph of its own and replay none."""
    mode = str(cfg.get("compile_mode") or "default")
    if mode not in COMPILE_MODES:
        raise ConfigError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got '{mode}'")
    if training and uses_cuda_graphs(mode):
        raise ConfigError(
            f"compile_mode={mode} records a CUDA graph per batch shape, and training batches each have shapes "
            "of their own: train with compile=true or compile_mode=max-autotune-no-cudagraphs (CUDA graphs are "
            "for eval and predict)"
        )
    return mode if bool(cfg.get("compile")) or mode != "default" else None


def uses_cuda_graphs(mode: str | None) -> bool:
    """Whether torch.compile's ``mode`` records CUDA graphs: the network's outputs then live in
    the graph's memory, which its next call overwrites, and each batch shape records a graph of
    its own (``collate_scenes(static=True)`` keeps the shapes few)."""
    return mode in CUDA_GRAPH_MODES


# the kernels a network's attention may be held to (``set_attention_kernel``): ``auto`` is torch's
# own choice for scaled_dot_product_attention (cuDNN's on an H100/H200), the next three are SDPA
# backends (the flash one takes no mask, so it is not among them), ``flex`` is flex_attention with a
# block mask from the key padding (key blocks wholly of padding keys skipped; a kernel inductor generates,
# so only for compiled networks: uncompiled, torch runs it unfused, slowly); ``varlen`` runs the
# attention of blocks that skip padding on their packed real tokens, no padding computed
# (``varlen_attention``: FlashAttention's variable-length kernel on a GPU in bf16 or fp16), and
# torch's choice elsewhere (blocks on the padded layout, float32 on a GPU)
ATTENTION_KERNELS = ("auto", "cudnn", "efficient", "math", "flex", "varlen")


# the kernels only a CUDA device has: torch's CPU has no cuDNN or memory-efficient SDPA backend,
# flex_attention compiles its kernel for a GPU (uncompiled or on the CPU it runs unfused, slowly),
# and ``varlen``'s stand-in off CUDA is quadratic in a batch's tokens
CUDA_ATTENTION_KERNELS = ("cudnn", "efficient", "flex", "varlen")


def check_attention_kernel(kernel: str, device_type: str | None = None) -> str:
    """``kernel`` if it is one of ``ATTENTION_KERNELS`` and (given the ``device_type`` a run puts
    the network on) runs there, else a one-line error."""
    if kernel not in ATTENTION_KERNELS:
        raise ConfigError(f"attention_kernel must be one of {', '.join(ATTENTION_KERNELS)}, got '{kernel}'")
    if device_type is not None and device_type != "cuda" and kernel in CUDA_ATTENTION_KERNELS:
        raise ConfigError(
            f"attention_kernel={kernel} runs on a CUDA device only, and this run is on {device_type}: "
            "use attention_kernel=auto (or math)"
        )
    return kernel
