"""bf16 against fp32 predictions of one trained checkpoint, on the same scenes: minFDE6 of fp32
and of bf16 inference, and how far the bf16 endpoints lie from the fp32 ones (metres, over every
mode): the most bf16 can move a minFDE6, to set against the published 1.43 m.

Without --checkpoint it trains a published-size PEFT model briefly on AV2-sized random scenes and
scores held-out ones (needs only torch, numpy and Lightning: the GPU machine's environment). Such a
model misses by metres, where any rounding is lost in the ratio of minFDE6; the endpoint shift
still bounds it. With --checkpoint (a `fpeft tune` checkpoint, run directory or adapter export)
and --cache (a preprocessed cache, `<data.root>/cache`) it scores that model on a cached split.
With --compile (and --attention-kernel) the bf16 pass runs the network as `fpeft eval --precision
bf16 compile=true attention_kernel=K` does, against the uncompiled fp32 one: what the fast path
changes, compiled code and attention kernel included.

    python -m benchmarks.check_bf16 --out benchmarks/results/bf16_check.json
    python -m benchmarks.check_bf16 --checkpoint data/runs/demo/tune_peft --cache data/demo/downtown/cache --out F
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.bench_train import build, to
from benchmarks.scenes import add_slot_multiple_option, random_batch
from forecast_peft.data.dataset import SLOT_MULTIPLE
from forecast_peft.evaluation import inference_network
from forecast_peft.lit.losses import forecast_losses
from forecast_peft.lit.optim import param_groups
from forecast_peft.metrics import ForecastMetrics
from forecast_peft.models.choices import ATTENTION_KERNELS
from forecast_peft.models.config import ModelConfig


def briefly_trained(args, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """A published-size PEFT model after ``args.steps`` bf16 steps on random scenes, and what to
    report of its training."""
    torch.manual_seed(0)
    cfg = ModelConfig()
    model = build("peft", cfg).to(device).train()
    opt = torch.optim.AdamW(param_groups(model, 1e-4), lr=1e-3)
    train = [to(random_batch(args.batch, seed=1000 + s), device) for s in range(8)]
    for step in range(args.steps):
        batch = train[step % len(train)]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = forecast_losses(model(batch), batch, cfg.reg_weight)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, {"train_steps": args.steps, "final_train_loss": float(loss.detach())}


def cached_batches(cache: Path, split: str, batch_size: int, slot_multiple: int = SLOT_MULTIPLE):
    """Batches of a cached split, in the cache's order (the same scenes for both precisions),
    their slots rounded up as the loaders round them (``data.slot_multiple``)."""
    from forecast_peft.data.dataset import ForecastDataset

    dataset = ForecastDataset(cache, split)
    dataset.slot_multiple = slot_multiple
    for start in range(0, len(dataset), batch_size):
        yield dataset.__getitems__(list(range(start, min(len(dataset), start + batch_size))))


def compare(model: torch.nn.Module, batches, device: torch.device, fast: torch.nn.Module | None = None) -> dict:
    """fp32 and bf16 metrics of ``model`` on ``batches`` (a function returning a fresh iterable),
    with the endpoint shift between the two; ``fast``: the network the bf16 pass runs instead
    (``model`` compiled, its attention held to a kernel)."""
    results, endpoints = {}, {}
    for precision in ("fp32", "bf16"):
        metrics = ForecastMetrics().to(device)
        ends = []
        network = fast if precision == "bf16" and fast is not None else model
        for batch in batches():
            batch = to(batch, device)
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                out = network(batch)
            metrics.update(out["y_hat"].float(), out["pi"].float(), batch["y"][:, 0])
            ends.append(out["y_hat"][:, :, -1].float())  # [B, K, 2]
        results[precision] = {k: float(v) for k, v in metrics.compute().items()}
        endpoints[precision] = torch.cat(ends)
    shift = (endpoints["bf16"] - endpoints["fp32"]).norm(dim=-1)  # [scenes, K] metres
    reach = endpoints["fp32"].norm(dim=-1)  # how far out the predicted endpoints lie
    rel = abs(results["bf16"]["minFDE6"] - results["fp32"]["minFDE6"]) / results["fp32"]["minFDE6"]
    return {
        "scenes": int(shift.shape[0]),
        "minFDE6_rel_diff": rel,
        "endpoint_shift_mean_m": float(shift.mean()),
        "endpoint_shift_max_m": float(shift.max()),
        "endpoint_distance_median_m": float(reach.median()),
        "endpoint_distance_max_m": float(reach.max()),
        **results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps of the brief model")
    parser.add_argument("--eval-batches", type=int, default=16, help="random batches scored (brief model)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--checkpoint", type=Path, help="a tuned checkpoint, run directory or adapter export")
    parser.add_argument("--cache", type=Path, help="the preprocessed cache to score --checkpoint on")
    parser.add_argument("--split", default="val")
    parser.add_argument("--compile", action="store_true", help="the bf16 pass compiled, as compile=true")
    parser.add_argument(
        "--attention-kernel", choices=ATTENTION_KERNELS, default="auto", help="the bf16 pass's attention kernel"
    )
    add_slot_multiple_option(parser)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if (args.checkpoint is None) != (args.cache is None):
        parser.error("--checkpoint and --cache go together")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.checkpoint is None:
        model, report = briefly_trained(args, device)
        report["data"] = "random scenes"

        def batches():
            return (
                random_batch(args.batch, seed=s, slot_multiple=args.slot_multiple) for s in range(args.eval_batches)
            )
    else:
        from forecast_peft.stages import load_tuned

        model = load_tuned(args.checkpoint)[0].model.to(device)
        report = {"checkpoint": str(args.checkpoint), "data": f"{args.cache} ({args.split})"}

        def batches():
            return cached_batches(args.cache, args.split, args.batch, args.slot_multiple)

    # the networks as fpeft eval runs them: adapters folded into the layers beside them; fp32
    # uncompiled, on torch's attention kernel
    reference = inference_network(model)
    fast = inference_network(model, "default" if args.compile else None, args.attention_kernel)
    report.update(compare(reference, batches, device, fast), adapters_folded=True)
    report.update(
        bf16_compiled=args.compile, bf16_attention_kernel=args.attention_kernel, slot_multiple=args.slot_multiple
    )
    report["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(json.dumps(report, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
