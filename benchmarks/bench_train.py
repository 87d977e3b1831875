"""Training and inference throughput of the published-size models.

Times MAE pre-training, PEFT and FT tuning steps and PEFT inference at batch 32 and 128, fp32 and
bf16, on AV2-sized random scenes (20-64 actors, 60-200 lanes); reports scenes/s, peak memory, the
bytes autograd saves for the backward pass (``saved_activation_gb``, any device), the work per
scene (``gflop_per_scene``: matrix products, convolutions and attention as
``torch.utils.flop_counter`` counts them; elementwise work not included) and the rate achieved
(``tflop_per_s``), and writes JSON rows. Task ``infer_sorted`` is inference on batches formed as
``fpeft eval`` and ``fpeft predict`` form them (``data.eval_order=size``): a pool of scenes ordered
by size, cut into consecutive batches, all of them timed equally often. Needs torch and numpy
only (no av2, hydra or Lightning), so it runs as is on a GPU machine, from the
repository root (`-m`: no install needed):

    python -m benchmarks.bench_train --device cuda --out benchmarks/results/h100.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from benchmarks.machine import cpu_name, device_name
from benchmarks.scenes import add_slot_multiple_option, random_batch, size_ordered_batches
from forecast_peft.data.dataset import SLOT_MULTIPLE
from forecast_peft.lit.losses import forecast_losses
from forecast_peft.lit.optim import param_groups
from forecast_peft.models import encoder
from forecast_peft.models.choices import ATTENTION_KERNELS, COMPILE_MODES, uses_cuda_graphs
from forecast_peft.models.compile import compilations, cudagraph_skips, maybe_compile
from forecast_peft.models.config import ModelConfig
from forecast_peft.models.forecaster import build_forecaster
from forecast_peft.models.layers import set_attention_kernel
from forecast_peft.models.mae import MAE_MASKS, MAEModel, sample_masks
from forecast_peft.peft.fold import fold_adapters
from forecast_peft.peft.freeze import configure_peft
from forecast_peft.runtime import keep_freed_memory

SORTED_POOL_BATCHES = 8


def _cpu_attention_flops() -> dict:
    """Counts for the CPU attention kernel, which torch.utils.flop_counter does not know (it counts
    the CUDA ones): without them CPU rows would leave attention out of ``gflop_per_scene``."""
    aten = torch.ops.aten

    def forward(q, k, v, *args, **kwargs):
        return sdpa_flop_count(q, k, v)

    def backward(grad_out, q, k, v, *args, **kwargs):
        return sdpa_backward_flop_count(grad_out, q, k, v)

    return {
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward,
    }


class SavedActivations:
    """The bytes autograd keeps for the backward pass of a training step (distinct storages,
    parameters left out), largest over the steps run under ``step()``: the bulk of a training
    step's peak memory, the same on any device (CPU rows included), for the eager model."""

    def __init__(self, model: torch.nn.Module):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.largest = 0

    @contextlib.contextmanager
    def step(self):
        storages: dict[int, int] = {}

        def keep(t: torch.Tensor) -> torch.Tensor:
            s = t.untyped_storage()
            if s.data_ptr() not in self.params:
                storages[s.data_ptr()] = s.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            yield
        self.largest = max(self.largest, sum(storages.values()))


def build(task: str, cfg: ModelConfig) -> torch.nn.Module:
    if task == "pretrain":
        return MAEModel(cfg)
    model = build_forecaster(cfg, "peft" if task in ("peft", "infer", "infer_sorted") else "ft")
    if task in ("peft", "infer", "infer_sorted"):
        configure_peft(model)
    return model


def to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def with_masks(task: str, host: dict, batch: dict, cfg: ModelConfig) -> dict:
    """The batch a step gets: for pre-training, ``batch`` (on the device) with fresh masks sampled
    from ``host`` (its copy on the host) and copied over, as MAEModule.on_before_batch_transfer does
    at every step; other tasks take ``batch`` as it is."""
    if task != "pretrain":
        return batch
    device = next(iter(batch.values())).device
    return {**batch, MAE_MASKS: to(sample_masks(host, cfg.mae, pin=device.type == "cuda"), device)}


def kernel_agreement(model, task: str, host: dict, batch: dict, cfg, kernel: str, precision: str) -> float:
    """Hold ``model``'s attention to ``kernel`` (``set_attention_kernel``) and return how far its
    outputs on ``batch`` lie from those of torch's own choice of kernel (relative norm; the same
    random draws for both), so that a row never times a kernel that computes something else."""
    outputs = []
    device = next(iter(batch.values())).device
    for name in ("auto", kernel):
        set_attention_kernel(model, name)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            torch.manual_seed(0)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                out = model(with_masks(task, host, batch, cfg))
        outputs.append((out["loss"] if task == "pretrain" else out["y_hat"]).double())
    want, got = outputs
    return float(f"{float((got - want).norm() / want.norm().clamp(min=1e-12)):.3g}")


def timed(step, indices, device: torch.device) -> float:
    """Seconds that ``step(i)`` takes for every i of ``indices``, the device's work included."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in indices:
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run(
    task: str,
    batch_size: int,
    precision: str,
    device: torch.device,
    steps: int,
    warmup: int,
    compile_: bool,
    compile_mode: str | None = None,
    sorted_pool: int = SORTED_POOL_BATCHES,
    fold: bool = True,
    attention: str = "auto",
    slot_multiple: int = SLOT_MULTIPLE,
) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig()
    model = build(task, cfg).to(device)
    # CUDA graphs replay a graph per batch shape: batches in the few fixed shapes `fpeft eval`
    # forms for them (padded layout, slots rounded up), so that new batches of a real split would
    # replay the graphs recorded here rather than record their own
    static = uses_cuda_graphs(compile_mode)
    if task == "infer_sorted":
        hosts = size_ordered_batches(batch_size, sorted_pool, static=static, slot_multiple=slot_multiple)
        steps = -(-steps // len(hosts)) * len(hosts)  # every batch of the pool equally often
    else:
        hosts = [random_batch(batch_size, seed=s, static=static, slot_multiple=slot_multiple) for s in range(3)]
    batches = [to(b, device) for b in hosts]
    train = not task.startswith("infer")
    model.train(train)
    fold = fold and not train
    if fold:  # as fpeft eval and predict run a PEFT model
        model = fold_adapters(model)
    agreement = (
        kernel_agreement(model, task, hosts[0], batches[0], cfg, attention, precision) if attention != "auto" else None
    )
    if train:
        opt = torch.optim.AdamW(param_groups(model, 1e-4), lr=1e-4, fused=device.type == "cuda")
    dtype = torch.bfloat16 if precision == "bf16" else None

    def step(i):
        batch = with_masks(task, hosts[i], batches[i], cfg)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype is not None):
            if not train:
                with torch.no_grad():
                    return model(batch)["y_hat"]
            out = model(batch)
            loss = out["loss"] if task == "pretrain" else forecast_losses(out, batch, cfg.reg_weight)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 5.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    # work per scene over the distinct batches, counted on the uncompiled model (one extra
    # step each); with the time below it gives the FLOP rate the device achieved
    saved = SavedActivations(model)
    with FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops()) as counter:
        for i in range(len(batches)):
            with saved.step():
                step(i)
    flop_per_scene = counter.get_total_flops() / (batch_size * len(batches))
    compiled_before, skipped_before = compilations(), cudagraph_skips()
    maybe_compile(model, compile_, compile_mode)  # as the stages compile (dynamic shapes), after the count
    if static:
        # CUDA graphs: each batch shape runs once plain and once recording before it replays
        warmup = max(warmup, 2 * len(batches))
    cold = task == "infer_sorted" and not static
    for i in range(warmup):
        step(0 if cold else i % len(batches))
    # size-ordered batches: each shape's first step, as a split's first pass meets it (a kernel may
    # build something per shape, as cuDNN's attention builds its execution plan), timed apart from
    # the steady rate below, which comes after every shape has run once
    new_shapes = compiled_on_new_shapes = None
    if cold and len(batches) > 1:
        before = compilations()
        new_shapes = timed(step, range(1, len(batches)), device)
        compiled_on_new_shapes = compilations() - before  # a recompilation would dwarf the rest
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    secs = timed(step, [i % len(batches) for i in range(steps)], device)
    # the CUDA allocator's peak; null elsewhere (JSON has no NaN: strict readers such as jq refused the file)
    peak = round(torch.cuda.max_memory_allocated() / 1e9, 2) if device.type == "cuda" else None
    return {
        "task": task,
        "batch": batch_size,
        "precision": precision,
        "scenes_per_s": round(batch_size * steps / secs, 1),
        # infer_sorted: the rate over each batch shape's first step (every batch but the first)
        "scenes_per_s_new_shapes": None if new_shapes is None else round(batch_size * (len(hosts) - 1) / new_shapes, 1),
        "gflop_per_scene": round(flop_per_scene / 1e9, 3),
        "tflop_per_s": round(flop_per_scene * batch_size * steps / secs / 1e12, 2),
        "peak_mem_gb": peak,
        "saved_activation_gb": round(saved.largest / 1e9, 3) if train else None,
        "gpu": device_name(device),
        "cpu": cpu_name(),
        "compiled": compile_,
        "compile_mode": (compile_mode or "default") if compile_ else None,
        "compilations": compilations() - compiled_before,
        "compilations_on_new_shapes": compiled_on_new_shapes,
        "steps": steps,
        "sorted_pool_batches": sorted_pool if task == "infer_sorted" else None,
        "packed_blocks": encoder.PACK_TOKENS and not static,
        "adapters_folded": fold,
        "attention_kernel": attention,
        # the held kernel's outputs against torch's own choice's, on the first batch (relative norm)
        "attention_kernel_rel_diff": agreement,
        # graphs compiled for CUDA graphs that ran without them: such a row times no CUDA graph
        "cudagraph_skips": cudagraph_skips() - skipped_before if static else None,
        "slot_multiple": None if static else slot_multiple,
        "batch_shapes": len({(b["x"].shape[:2], b["lane_positions"].shape[1]) for b in hosts}),
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tasks", default="pretrain,peft,ft,infer,infer_sorted")
    parser.add_argument("--batches", default="32,128")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 on GPU, 2 on CPU)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model as compile=true does")
    parser.add_argument(
        "--compile-mode",
        choices=COMPILE_MODES,
        default=None,
        help="torch.compile mode (implies --compile); reduce-overhead and max-autotune add CUDA graphs",
    )
    parser.add_argument(
        "--sorted-pool",
        type=int,
        default=SORTED_POOL_BATCHES,
        help="infer_sorted: batches cut from one size-ordered pool (a validation split has hundreds)",
    )
    add_slot_multiple_option(parser)
    parser.add_argument(
        "--padded-blocks",
        action="store_true",
        help="transformer blocks on the padded token layout (the form before padding-free blocks), to compare",
    )
    parser.add_argument(
        "--unfolded-adapters",
        action="store_true",
        help="inference with the adapters as layers of their own (as before fpeft eval folded them), to compare",
    )
    parser.add_argument(
        "--cpp-wrapper",
        action="store_true",
        help="inductor calls the kernels from generated C++ instead of Python (less host work per launch; "
        "implies --compile; the first compile takes longer)",
    )
    parser.add_argument(
        "--attention-kernel",
        choices=ATTENTION_KERNELS,
        default="auto",
        help="hold the transformer attention to one SDPA kernel (auto: torch's choice), to compare",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    encoder.PACK_TOKENS = not args.padded_blocks
    malloc_kept = keep_freed_memory()  # as fpeft does
    steps = args.steps or (20 if device.type == "cuda" else 2)
    warmup = args.warmup if args.warmup is not None else (5 if device.type == "cuda" else 1)
    compile_ = args.compile or args.compile_mode is not None or args.cpp_wrapper
    if args.cpp_wrapper:
        import torch._inductor.config as inductor_config

        inductor_config.cpp_wrapper = True
    mode = args.compile_mode
    fold = not args.unfolded_adapters
    rows = []
    for task in args.tasks.split(","):
        for b in map(int, args.batches.split(",")):
            for precision in args.precisions.split(","):
                row = run(
                    task,
                    b,
                    precision,
                    device,
                    steps,
                    warmup,
                    compile_,
                    mode,
                    args.sorted_pool,
                    fold,
                    args.attention_kernel,
                    args.slot_multiple,
                )
                row["malloc_kept"] = malloc_kept
                row["cpp_wrapper"] = args.cpp_wrapper
                rows.append(row)
                print(json.dumps(row), flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(rows, indent=1))  # after every row: a cut-off run keeps its rows


if __name__ == "__main__":
    main()
