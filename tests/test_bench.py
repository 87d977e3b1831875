"""The benchmark's rows (issue: task, batch, precision, scenes_per_s, peak_mem_gb, gpu), as strict
JSON: a CPU row's peak memory was NaN, which JSON does not have (jq and other strict readers
refused benchmarks/results/cpu.json)."""

import importlib.util
import json
import re
from pathlib import Path

import torch

from benchmarks.bench_train import run


def test_a_benchmark_row_is_strict_json_with_the_issue_fields():
    row = run("infer", 2, "fp32", torch.device("cpu"), steps=1, warmup=0, compile_=False)
    parsed = json.loads(json.dumps(row, allow_nan=False))
    assert {"task", "batch", "precision", "scenes_per_s", "peak_mem_gb", "gpu"} <= set(parsed)
    assert parsed["task"] == "infer" and parsed["batch"] == 2 and parsed["precision"] == "fp32"
    assert parsed["scenes_per_s"] > 0 and parsed["gflop_per_scene"] > 0
    assert parsed["peak_mem_gb"] is None  # measured by the CUDA allocator only
    assert parsed["cpu"].endswith(")")  # the processor and torch's instruction set, "AMD EPYC (AVX2)"


def test_the_makefile_runs_the_benchmarks_as_modules_that_exist():
    """``make bench`` ran ``python benchmarks/bench_train.py`` after the scripts became modules of
    the ``benchmarks`` package, and failed on its first import; the GPU suite has the same form."""
    root = Path(__file__).resolve().parents[1]
    commands = (root / "Makefile").read_text() + (root / "benchmarks" / "gpu_suite.sh").read_text()
    assert not re.findall(r"(?:\$\(PY\)|python3?|\$py\"?)\s+benchmarks/\w+\.py", commands)
    modules = re.findall(r"-m (benchmarks\.\w+)", commands)
    assert {"benchmarks.bench_train", "benchmarks.bench_data", "benchmarks.check_bf16"} <= set(modules)
    for name in modules:
        assert importlib.util.find_spec(name) is not None, name
