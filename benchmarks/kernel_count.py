"""How many kernels one compiled inference forward launches, by kind.

Compiles the published-size PEFT (or FT) forecaster as ``fpeft eval`` does (``compile=true``,
dynamic shapes, bf16 autocast by default), runs it once on a small batch of AV2-sized random scenes
and counts the launches in the ``call()`` of the code inductor generated: its own fused kernels
(Triton on a GPU, C++ on the CPU) and the library calls (matrix products, attention,
convolutions). Where a step is bound by launches rather than by arithmetic, this count, not the
FLOPs, is what a change has to cut. On the CPU the fused kernels are C++ instead of Triton, in
about the same number; the library calls are the same.

    python -m benchmarks.kernel_count [--device cuda] [--mode ft] [--precision fp32] [--forms folded] [--out F]
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

import torch

from benchmarks.scenes import random_batch
from forecast_peft.models.compile import compile_forward
from forecast_peft.models.config import ModelConfig
from forecast_peft.models.forecaster import build_forecaster
from forecast_peft.peft.freeze import configure_peft

# a call in the generated code -> its kind (first match wins: fused kernels' names carry the
# names of the operations they fuse)
KINDS = (
    ("fused", re.compile(r"^\s*(?:\w+\.run\(|cpp_fused_\w+\(|triton_\w+\.run\()")),
    ("addmm", re.compile(r"\bextern_kernels\.addmm\(")),
    ("mm", re.compile(r"\bextern_kernels\.mm\(")),
    ("bmm", re.compile(r"\bextern_kernels\.bmm\(")),
    ("attention", re.compile(r"_scaled_dot_product_\w+attention\w*\.default\(|_scaled_dot_product_\w*\(")),
    ("convolution", re.compile(r"\bextern_kernels\.convolution\(|\bconvolution\.default\(")),
    ("other library call", re.compile(r"\b(?:extern_kernels|aten|torch\.ops)\.[\w.]+\(")),
)


def call_body(code: str) -> list[str]:
    """The lines of the generated module's ``call`` function (where the launches are)."""
    lines = code.splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(r"\s*def call\(", line)), None)
    if start is None:
        return []
    indent = len(lines[start]) - len(lines[start].lstrip())
    body = []
    for line in lines[start + 1 :]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        body.append(line)
    return body


def count_launches(code: str) -> collections.Counter:
    """Launches by kind in one generated module's ``call``."""
    counts = collections.Counter()
    for line in call_body(code):
        if line.strip().startswith("#"):
            continue
        for kind, pattern in KINDS:
            if pattern.search(line):
                counts[kind] += 1
                break
    return counts


def measure(mode: str, precision: str, fold: bool, batch_size: int, device: torch.device) -> dict:
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    cfg = ModelConfig()
    model = build_forecaster(cfg, mode)
    if mode == "peft":
        configure_peft(model)
    model.to(device).eval()
    if fold:
        from forecast_peft.peft.fold import fold_adapters

        model = fold_adapters(model)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in random_batch(batch_size).items()}
    forward = compile_forward(model.forward)

    def run():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            return forward(batch)

    _, codes = run_and_get_code(run)
    counts = collections.Counter()
    for code in codes:
        counts.update(count_launches(code))
    return {
        "model": mode,
        "precision": precision,
        "adapters_folded": fold,
        "device": device.type,
        "graphs": len(codes),
        "launches": sum(counts.values()),
        "by_kind": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mode", choices=("peft", "ft", "baseline"), default="peft")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument(
        "--forms",
        default="folded,unfolded",
        help="the network's forms to count: folded (adapters folded in, as fpeft eval runs it), unfolded",
    )
    parser.add_argument("--batch", type=int, default=2, help="scenes in the traced batch (the graph is the same)")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here too")
    args = parser.parse_args()
    forms = args.forms.split(",")
    if not forms or set(forms) - {"folded", "unfolded"}:
        parser.error(f"--forms takes folded and/or unfolded, got '{args.forms}'")
    rows = []
    for form in forms:
        torch.compiler.reset()  # each form its own compilation
        row = measure(args.mode, args.precision, form == "folded", args.batch, torch.device(args.device))
        print(json.dumps(row), flush=True)
        rows.append(row)
        if args.out:
            args.out.write_text(json.dumps(rows, indent=1) + "\n")
        if not row["launches"]:
            sys.exit("no launches found in the generated code: has inductor's output format changed?")


if __name__ == "__main__":
    main()
