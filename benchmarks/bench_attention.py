"""The network's attention alone, at the shapes a batch of AV2-sized random scenes gives it, in
each way a GPU can run it: which one the network should use. Session 26's H200 profile of
compiled PEFT inference put a third of its kernel time in cuDNN's attention (0.51 ms a call at a
head width of 16), so this times, per call and in bf16:

- ``sdpa_cudnn``, ``sdpa_efficient``, ``sdpa_math``: scaled_dot_product_attention on the padded
  layout with the key-padding mask, as the network runs it, on one backend each;
- ``sdpa_flash_nomask``: the flash kernel without any mask (it takes none): a bound, not a
  candidate, since padding keys would be attended to;
- ``flex_padded``: compiled flex_attention on the padded layout, its block mask from the key
  padding (blocks wholly of padding keys skipped);
- ``flex_packed``: compiled flex_attention on the real tokens of every row end to end, the mask
  keeping each row to itself (no padding computed at all);
- ``varlen_packed``: torch's ``varlen_attn`` (FlashAttention's variable-length kernel, CUDA only,
  torch 2.10 on) on the same packed tokens, each row delimited by cumulative lengths.

For the encoder (each scene's actors and lanes; the context prompts as extra keys) and the decoder
(each scene and mode: prompts, history, future and lane tokens), on random and size-ordered
batches, with the same shape repeated (``ms``) and, for the padded ways, on new shapes each call
(``ms_new_shapes``: what a backend spends on a shape it has not seen, as a split's batches bring).

python -m benchmarks.bench_attention [--device cuda] [--batch 128] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.machine import device_name
from benchmarks.scenes import random_batch, size_ordered_batches
from forecast_peft.models.config import ModelConfig
from forecast_peft.models.layers import attention

# in the order they run: the network's candidates that need no compilation first, then the
# bound and the slow reference, then flex_attention's (each compiles for its shapes)
WAYS = (
    "sdpa_cudnn",
    "sdpa_efficient",
    "varlen_packed",
    "sdpa_flash_nomask",
    "sdpa_math",
    "flex_padded",
    "flex_packed",
)


def attention_shapes(batch: dict, cfg: ModelConfig) -> dict[str, dict]:
    """The encoder's and the decoder's attention for ``batch``: rows, query and key slots, and each
    row's real keys (those first, then padding; the network interleaves them, which costs the
    padded kernels the same)."""
    actors = (~batch["x_key_padding_mask"]).sum(1)
    lanes = (~batch["lane_key_padding_mask"]).sum(1)
    n, m = batch["x_key_padding_mask"].shape[1], batch["lane_key_padding_mask"].shape[1]
    p, k = cfg.peft.num_prompts, cfg.num_modes
    return {
        "encoder": {"queries": n + m, "keys": n + m + p, "real": actors + lanes + p},
        "decoder": {
            "queries": p + 2 * n + m,
            "keys": p + 2 * n + m,
            "real": (p + 2 * actors + lanes).repeat_interleave(k),
        },
    }


def inputs(shape: dict, heads: int, width: int, device, dtype=torch.bfloat16, seed: int = 0):
    """Random queries, keys and values [R, H, L, d] and the key mask [R, 1, 1, L] for ``shape``."""
    g = torch.Generator().manual_seed(seed)
    rows = len(shape["real"])
    q = torch.randn(rows, heads, shape["queries"], width, generator=g).to(device, dtype)
    k, v = (torch.randn(rows, heads, shape["keys"], width, generator=g).to(device, dtype) for _ in range(2))
    real = shape["real"].to(device)
    attend = torch.arange(shape["keys"], device=device)[None] < real[:, None]
    return q, k, v, attend


def way_function(way: str, q, k, v, attend):
    """A function of no arguments that runs ``way`` once on these inputs (its set-up done)."""
    if way == "sdpa_flash_nomask":  # the flash kernel takes no mask: a bound, not one of the network's
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def run():
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v)

        return run
    if way.startswith("sdpa_"):  # as the network's attention runs when held to that kernel
        return lambda: attention(q, k, v, attend, way.removeprefix("sdpa_"))
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    device = q.device
    if way == "varlen_packed":
        return varlen_function(q, k, v, attend)
    if way == "flex_padded":

        def keep(b, h, qi, ki):
            return attend[b, ki]

        mask = create_block_mask(keep, q.shape[0], None, q.shape[2], k.shape[2], device=device)
        return lambda: flex(q, k, v, block_mask=mask)
    # flex_packed: each row's real queries and keys, end to end, in one sequence [1, H, T, d]
    qp, kp, vp, lengths, real = (t.transpose(0, 1)[None] if t.ndim == 3 else t for t in packed(q, k, v, attend))
    q_row = torch.repeat_interleave(torch.arange(len(real), device=device), lengths)
    k_row = torch.repeat_interleave(torch.arange(len(real), device=device), real)

    def same_row(b, h, qi, ki):
        return q_row[qi] == k_row[ki]

    # compiled: evaluated block by block, never the whole [tokens, tokens] grid
    mask = torch.compile(create_block_mask)(same_row, None, None, qp.shape[2], kp.shape[2], device=device)
    return lambda: flex(qp, kp, vp, block_mask=mask)


def packed(q, k, v, attend):
    """Each row's real queries and keys end to end: q [Tq, H, d], k and v [Tk, H, d], and the real
    queries and keys per row (the real keys first in each row, as ``inputs`` lays them out)."""
    real = attend.sum(1)
    lengths = real if q.shape[2] == k.shape[2] else real - (k.shape[2] - q.shape[2])
    keep_q = torch.arange(q.shape[2], device=q.device)[None] < lengths[:, None]
    return q.transpose(1, 2)[keep_q], k.transpose(1, 2)[attend], v.transpose(1, 2)[attend], lengths, real


def varlen_function(q, k, v, attend):
    """``varlen_attn`` on the packed real tokens of q, k, v [R, H, L, d] (torch 2.10 on, CUDA)."""
    from torch.nn.attention.varlen import varlen_attn

    qp, kp, vp, lengths, real = packed(q, k, v, attend)
    zero = lengths.new_zeros(1)
    cu_q = torch.cat([zero, lengths.cumsum(0)]).int()
    cu_k = torch.cat([zero, real.cumsum(0)]).int()
    return lambda: varlen_attn(qp, kp, vp, cu_q, cu_k, q.shape[2], k.shape[2])


def time_calls(fn, sync, repeat: int) -> float:
    """Mean milliseconds per call of ``fn`` over ``repeat`` calls, after two warm-up calls."""
    for _ in range(2):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - start) / repeat * 1e3


def new_shapes_ms(way: str, shape: dict, heads: int, width: int, device, sync, count: int) -> float:
    """Mean milliseconds per call over ``count`` calls, each on a shape not seen before (one more
    query and key slot each time), set-up included."""
    total = 0.0
    for extra in range(1, count + 1):
        grown = {**shape, "queries": shape["queries"] + extra, "keys": shape["keys"] + extra}
        q, k, v, attend = inputs(grown, heads, width, device, seed=extra)
        sync()
        start = time.perf_counter()
        way_function(way, q, k, v, attend)()
        sync()
        total += time.perf_counter() - start
    return total / count * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--new-shapes", type=int, default=4, help="calls on unseen shapes per padded way")
    parser.add_argument("--ways", default=",".join(WAYS))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    cfg = ModelConfig()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    heads, width = cfg.num_heads, cfg.embed_dim // cfg.num_heads
    batches = {"random": random_batch(args.batch), "size_ordered": size_ordered_batches(args.batch, 8)[3]}
    rows = []
    for order, batch in batches.items():
        # the decoder's first: the largest attention, the one a time limit should not cut
        for stage, shape in sorted(attention_shapes(batch, cfg).items(), key=lambda item: item[0] != "decoder"):
            q, k, v, attend = inputs(shape, heads, width, device)
            for way in args.ways.split(","):
                row = {"way": way, "stage": stage, "batches": order, **measure(way, shape, q, k, v, attend, sync, args)}
                row.update(device=device_name(device), torch=torch.__version__)
                print(json.dumps(row), flush=True)
                rows.append(row)
                if args.out is not None:  # after every row: a time limit keeps what was measured
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps(rows, indent=1))


def measure(way: str, shape: dict, q, k, v, attend, sync, args) -> dict:
    """One row: ``way`` on these inputs, its shape, the share of the padded work that is real, and
    its time (or the error of a kernel that cannot take them here)."""
    heads, width = q.shape[1], q.shape[3]
    flop = 4 * heads * width * float(shape["queries"] * shape["keys"]) * len(shape["real"])
    real_queries = shape["real"] - (shape["keys"] - shape["queries"])
    real_flop = 4 * heads * width * float((shape["real"].double() * real_queries).sum())
    row = {
        "rows": len(shape["real"]),
        "query_slots": shape["queries"],
        "key_slots": shape["keys"],
        "real_share": round(real_flop / flop, 3),
    }
    try:
        row["ms"] = round(time_calls(way_function(way, q, k, v, attend), sync, args.repeat), 4)
        row["tflop_per_s"] = round((real_flop if way.endswith("_packed") else flop) / row["ms"] / 1e9, 2)
        if not way.startswith("flex") and args.new_shapes:
            row["ms_new_shapes"] = round(new_shapes_ms(way, shape, heads, width, q.device, sync, args.new_shapes), 4)
    except Exception as err:  # a backend that cannot take these inputs here
        said = str(err).splitlines()[0][:200] if str(err) else ""
        row["error"] = f"{type(err).__name__}: {said}"
    return row


if __name__ == "__main__":
    main()
