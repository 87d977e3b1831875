"""The benchmark's rows (issue: task, batch, precision, scenes_per_s, peak_mem_gb, gpu), as strict
JSON: a CPU row's peak memory was NaN, which JSON does not have (jq and other strict readers
refused benchmarks/results/cpu.json)."""

import json

import torch

from benchmarks.bench_train import run


def test_a_benchmark_row_is_strict_json_with_the_issue_fields():
    row = run("infer", 2, "fp32", torch.device("cpu"), steps=1, warmup=0, compile_=False)
    parsed = json.loads(json.dumps(row, allow_nan=False))
    assert {"task", "batch", "precision", "scenes_per_s", "peak_mem_gb", "gpu"} <= set(parsed)
    assert parsed["task"] == "infer" and parsed["batch"] == 2 and parsed["precision"] == "fp32"
    assert parsed["scenes_per_s"] > 0 and parsed["gflop_per_scene"] > 0
    assert parsed["peak_mem_gb"] is None  # measured by the CUDA allocator only
