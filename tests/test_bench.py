"""The benchmark's rows (issue: task, batch, precision, scenes_per_s, peak_mem_gb, gpu), as strict
JSON: a CPU row's peak memory was NaN, which JSON does not have (jq and other strict readers
refused benchmarks/results/cpu.json)."""

import importlib.util
import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.bench_train import run
from tests.conftest import rounded_slots


def test_a_benchmark_row_is_strict_json_with_the_issue_fields():
    row = run("infer", 2, "fp32", torch.device("cpu"), steps=1, warmup=0, compile_=False)
    parsed = json.loads(json.dumps(row, allow_nan=False))
    assert {"task", "batch", "precision", "scenes_per_s", "peak_mem_gb", "gpu"} <= set(parsed)
    assert parsed["task"] == "infer" and parsed["batch"] == 2 and parsed["precision"] == "fp32"
    assert parsed["scenes_per_s"] > 0 and parsed["gflop_per_scene"] > 0
    assert parsed["peak_mem_gb"] is None  # measured by the CUDA allocator only
    assert parsed["cpu"].endswith(")")  # the processor and torch's instruction set, "AMD EPYC (AVX2)"


def test_a_row_held_to_an_attention_kernel_says_how_far_its_outputs_lie_from_the_default(monkeypatch):
    """``bench_train.py --attention-kernel``: the row compares the held kernel's outputs with
    torch's own choice's on its first batch, so a kernel that computes something else shows."""
    from forecast_peft.models import layers

    cpu = torch.device("cpu")
    row = run("infer", 2, "fp32", cpu, steps=1, warmup=0, compile_=False, attention="math")
    assert row["attention_kernel"] == "math" and row["attention_kernel_rel_diff"] < 1e-5
    assert run("infer", 2, "fp32", cpu, steps=1, warmup=0, compile_=False)["attention_kernel_rel_diff"] is None
    right = layers.attention

    def wrong(q, k, v, attend, kernel):  # "math" attends to padding keys too
        return right(q, k, v, None if kernel == "math" else attend, kernel)

    monkeypatch.setattr(layers, "attention", wrong)
    row = run("infer", 2, "fp32", cpu, steps=1, warmup=0, compile_=False, attention="math")
    assert row["attention_kernel_rel_diff"] > 1e-3


def test_size_ordered_batches_time_each_new_shape_apart_from_the_steady_rate(monkeypatch):
    """``infer_sorted``: the warm-up steps run the first batch only, then each other batch's first
    step is timed on its own (``scenes_per_s_new_shapes``: what a split's first pass meets, cuDNN
    building an attention plan per shape for one), and the steady rate comes after every shape has
    run (session 26's H200 row mixed three first steps into its 24 timed ones)."""
    from benchmarks import bench_train

    seen = []
    with_masks = bench_train.with_masks

    def record(task, host, batch, cfg):
        seen.append(host["x"].shape[1])  # the batch's actor slots: size-ordered, one per batch
        return with_masks(task, host, batch, cfg)

    monkeypatch.setattr(bench_train, "with_masks", record)
    # a stand-in count of compilations: one per step so far, so that the row's count over the new
    # shapes' pass says how many steps that pass took
    monkeypatch.setattr(bench_train, "compilations", lambda: len(seen))
    cpu = torch.device("cpu")
    # slots as they are (not rounded up to data.slot_multiple's 8): three batches, three shapes
    row = run("infer_sorted", 2, "fp32", cpu, steps=3, warmup=2, compile_=False, sorted_pool=3, slot_multiple=1)
    assert row["batch_shapes"] == 3 and row["steps"] == 3 and row["scenes_per_s_new_shapes"] > 0
    assert row["compilations_on_new_shapes"] == 2 and row["slot_multiple"] == 1
    slots = seen[:3]  # the work count runs each batch once first
    assert len(set(slots)) == 3 and seen[3:] == [slots[0]] * 2 + slots[1:] + slots
    assert run("infer", 2, "fp32", cpu, steps=1, warmup=0, compile_=False)["scenes_per_s_new_shapes"] is None


def test_benchmark_batches_round_their_slots_as_the_loaders_do():
    """The benchmark's batches are collated as ``fpeft`` collates them: slots rounded up to
    ``data.slot_multiple``'s default, said in the row, unless ``--slot-multiple`` says otherwise."""
    from benchmarks.scenes import size_ordered_batches
    from forecast_peft.data.dataset import SLOT_MULTIPLE

    row = run("infer_sorted", 2, "fp32", torch.device("cpu"), steps=1, warmup=0, compile_=False, sorted_pool=6)
    assert row["slot_multiple"] == SLOT_MULTIPLE == 8
    rounded, plain = (size_ordered_batches(2, 6, slot_multiple=k) for k in (SLOT_MULTIPLE, 1))
    assert len(set(rounded_slots(rounded, plain, 8))) == row["batch_shapes"]


def test_the_deploy_benchmark_times_the_network_and_its_exported_program():
    from benchmarks.bench_deploy import bench

    (row,) = bench("tiny", "baseline", [2], agents=5, lanes=7, repeats=1, aoti=False)
    assert (row["model"], row["mode"], row["batch"], row["agents"], row["lanes"]) == ("tiny", "baseline", 2, 5, 7)
    assert row["export_s"] > 0 and row["eager_ms"] > 0 and row["program_ms"] > 0 and "aoti_ms" not in row


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


# The GPU machine has torch, numpy, pandas and Lightning but none of these (the device tool's
# package list); a session there has 15 minutes in all, too few to lose one to an import.
MISSING_ON_THE_GPU_MACHINE = ("hydra", "omegaconf", "av2", "typer")

RUN_WITHOUT = """
import importlib, importlib.abc, runpy, sys

class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {missing!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

sys.meta_path.insert(0, Missing())
for name in {imports!r}:
    importlib.import_module(name)
for argv in {runs!r}:
    sys.argv = list(argv)
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
"""


def _run_without_the_gpu_machine_s_missing_packages(imports: list[str], runs: list[list[str]]) -> None:
    import subprocess
    import sys

    script = RUN_WITHOUT.format(missing=MISSING_ON_THE_GPU_MACHINE, imports=imports, runs=runs)
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _gpu_suite_modules() -> list[str]:
    suite = (Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.sh").read_text()
    return sorted(set(re.findall(r"-m (benchmarks\.\w+)", suite))) + ["tests.test_gpu"]


def test_the_gpu_suite_s_modules_import_without_the_packages_the_gpu_machine_lacks():
    """Every module the GPU suite names (and tests/test_gpu.py) imports with hydra, omegaconf, av2
    and typer absent (their lazy imports: the next test, in ``make test-slow``)."""
    modules = _gpu_suite_modules()
    assert {"benchmarks.bench_train", "benchmarks.check_bf16", "benchmarks.e2e_epoch"} <= set(modules)
    _run_without_the_gpu_machine_s_missing_packages(modules, [])


@pytest.mark.slow  # 16 s: the suite's scripts, each a fresh start of the network
def test_the_gpu_suite_runs_without_the_packages_the_gpu_machine_lacks(tmp_path, monkeypatch, request):
    """The suite's scripts run on the CPU at toy sizes with hydra, omegaconf, av2 and typer absent
    (their lazy imports included): inference and PEFT rows, the bf16 check, a Lightning epoch and
    `fpeft eval`'s loop. ``e2e_epoch`` removes the cache it built in the temporary folder."""
    # a folder of its own in the system's temporary folder, not under tmp_path: the DataLoader workers'
    # fork server puts its socket there, and a socket's path is at most 107 characters
    scratch = Path(tempfile.mkdtemp(prefix="fpeft-test-"))
    request.addfinalizer(lambda: shutil.rmtree(scratch, ignore_errors=True))
    monkeypatch.setenv("TMPDIR", str(scratch))
    small = ["--no-progress", "--accelerator", "cpu", "--precision", "32", "--workers", "1", "--batch", "4"]
    runs = [
        ["benchmarks.bench_train", "--device", "cpu", "--batches", "2", "--steps", "1", "--warmup", "0",
         "--tasks", "infer,peft", "--precisions", "fp32", "--out", str(tmp_path / "bench.json")],
        ["benchmarks.check_bf16", "--steps", "1", "--eval-batches", "1", "--batch", "2", "--attention-kernel", "math",
         "--out", str(tmp_path / "bf16.json")],
        ["benchmarks.e2e_epoch", "--scenes", "8", *small, "--out", str(tmp_path / "e2e.json")],
        ["benchmarks.e2e_epoch", "--task", "infer", "--scenes", "8", *small, "--attention-kernel", "math",
         "--out", str(tmp_path / "infer.json")],
        ["benchmarks.bench_attention", "--device", "cpu", "--batch", "2", "--repeat", "1", "--new-shapes", "1",
         "--ways", "sdpa_math,flex_packed", "--out", str(tmp_path / "attention.json")],
        ["benchmarks.bench_deploy", "--device", "cpu", "--batches", "2", "--agents", "5", "--lanes", "7",
         "--repeats", "1", "--no-aoti", "--out", str(tmp_path / "deploy.json")],
    ]  # fmt: skip
    _run_without_the_gpu_machine_s_missing_packages([], runs)
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert [r["task"] for r in rows] == ["infer", "peft"] and all(r["scenes_per_s"] > 0 for r in rows)
    bf16 = json.loads((tmp_path / "bf16.json").read_text())
    assert bf16["device"] == "cpu" and bf16["bf16_attention_kernel"] == "math" and not bf16["bf16_compiled"]
    assert json.loads((tmp_path / "e2e.json").read_text())["scenes"] == 8
    assert not list(scratch.glob("fpeft-e2e-*"))
    infer = json.loads((tmp_path / "infer.json").read_text())
    assert infer["scenes"] == 8 and infer["attention_kernel"] == "math"
    attention = json.loads((tmp_path / "attention.json").read_text())
    assert len(attention) == 8 and all(r["ms"] > 0 for r in attention)  # 2 ways x encoder, decoder x 2 orders
    (deploy,) = json.loads((tmp_path / "deploy.json").read_text())
    assert deploy["model"] == "forecast_mae" and deploy["device"] == "cpu" and deploy["program_ms"] > 0


def test_the_check_of_missing_packages_can_fail(tmp_path):
    """The stand-in for a missing package does make an import of it fail."""
    import subprocess
    import sys

    script = RUN_WITHOUT.format(missing=MISSING_ON_THE_GPU_MACHINE, imports=["forecast_peft.config"], runs=[])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "No module named" in done.stderr


def test_the_gpu_suite_profiles_only_while_no_inference_row_meets_the_target(tmp_path):
    """``gpu_suite.sh first`` profiles the compiled pass only while no batch-128 ``infer`` row of
    its files reaches 10,000 scenes/s (#8's target, ``benchmarks/targets.py``): a missing file or
    row meets nothing."""
    import subprocess
    import sys

    suite = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.sh"
    function = re.search(r"^target_met\(\) \{.*?^\}$", suite.read_text(), re.S | re.M).group(0)
    files = {}
    for name, rate in (("below", 7834.0), ("met", 10500.0), ("missing", None)):
        files[name] = tmp_path / f"{name}.json"
        if rate is not None:
            rows = [{"task": "infer_sorted", "batch": 128, "scenes_per_s": 20000.0}]
            rows += [{"task": "infer", "batch": 32, "scenes_per_s": 20000.0}]  # #8's target is at batch 128
            rows += [{"task": "infer", "batch": 128, "scenes_per_s": rate}]
            files[name].write_text(json.dumps(rows))
    codes = {}
    for names in (("below",), ("met",), ("missing",), ("below", "met"), ("missing", "below")):
        paths = " ".join(f'"{files[n]}"' for n in names)
        script = f'py="{sys.executable}"\n{function}\ntarget_met {paths}'
        codes[names] = subprocess.run(["bash", "-c", script], capture_output=True, cwd=suite.parents[1]).returncode
    assert codes == {("below",): 1, ("met",): 0, ("missing",): 1, ("below", "met"): 0, ("missing", "below"): 1}


FAKE_PYTHON = r"""#!/usr/bin/env bash
# stands in for python in gpu_suite.sh: the real one reads the rows (-c); a step is logged and
# writes an infer row to its --out
[ "$1" = "-c" ] && exec "$REAL_PYTHON" "$@"
echo "$*" >> "$CALLS"
out=""; prev=""
for arg in "$@"; do
    [ "$prev" = "--out" ] && out=$arg
    case "$arg" in --junitxml=*) echo "<testsuites/>" > "${arg#--junitxml=}" ;; esac
    prev=$arg
done
case "$*" in
    *"-m benchmarks.bench_train"*max-autotune\ *) rate=$AUTOTUNED ;;
    *"-m benchmarks.bench_train"*reduce-overhead*) rate=$GRAPHS ;;
    *"-m benchmarks.bench_train"*"--attention-kernel "*) rate=${KERNEL_RATE:-$COMPILED} ;;
    *) rate=$COMPILED ;;
esac
row="{\"task\": \"infer\", \"batch\": 128, \"scenes_per_s\": $rate}"
[ "$rate" = "FAIL" ] && row=""  # a step that failed before its first row
case "$*" in  # the attention benchmark's rows: the decoder's random batch, per kernel
    *"-m benchmarks.bench_attention"*)
        at="\"stage\": \"decoder\", \"batches\": \"random\""
        [ -n "$ONLY_CUDNN" ] && echo "[{\"way\": \"sdpa_cudnn\", $at, \"ms\": 1.0}]" > "$out" && exit 0
        row="{\"way\": \"sdpa_cudnn\", $at, \"ms\": 1.0},
             {\"way\": \"sdpa_efficient\", $at, \"ms\": ${EFFICIENT_MS:-2.0}},
             {\"way\": \"flex_padded\", $at, \"ms\": ${FLEX_MS:-2.0}}, {\"way\": \"flex_packed\", $at, \"ms\": 0.1},
             {\"way\": \"varlen_packed\", $at, \"ms\": ${VARLEN_MS:-2.0}}" ;;
esac
[ -z "$out" ] || echo "[$row]" > "$out"
"""


@pytest.mark.parametrize(
    "compiled, kernel_rate, efficient_ms, flex_ms, varlen_ms, tried, kept, profiled",
    [
        (9823, 10500, 0.4, 0.6, 2.0, "efficient", "efficient", False),  # efficient: faster, and meets it
        (9823, 9900, 0.6, 0.4, 2.0, "flex", "flex", True),  # flex: faster, still under: a profile with it
        (9823, 11000, 0.6, 0.5, 0.3, "varlen", "varlen", False),  # varlen
        (9823, "FAIL", 0.6, 0.5, 0.3, "varlen", "auto", True),  # its run fails: the network as it is
        (9823, 9000, 1.1, 1.2, 1.3, "efficient", "auto", True),  # tried though cuDNN's attention is faster; slower
        (10500, 0, 2.0, 2.0, 2.0, "efficient", "auto", False),  # met as it is
        (9823, 0, None, None, None, None, "auto", True),  # the attention benchmark timed cuDNN's alone
    ],
)
def test_the_gpu_suite_first_part_tries_the_fastest_other_kernel_and_keeps_the_faster_network(
    compiled, kernel_rate, efficient_ms, flex_ms, varlen_ms, tried, kept, profiled, tmp_path
):
    """``gpu_suite.sh first`` runs its steps in order. It times inference held to the attention
    kernel other than cuDNN's that the attention benchmark timed fastest on the decoder, faster than
    cuDNN's there or not (the whole pass decides: varlen also drops the unpacking, and cuDNN builds
    a plan per new shape). The bf16 check and the profile take the faster of the two networks, and
    the profile runs only while no inference row meets 10,000 scenes/s. It leaves at most the 8
    files the device tool returns."""
    import os
    import stat
    import subprocess
    import sys

    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out, calls = tmp_path / "out", tmp_path / "calls.txt"
    env = dict(os.environ, PYTHON=str(fake), REAL_PYTHON=sys.executable, OUT=str(out), CALLS=str(calls))
    env.update(COMPILED=str(compiled), KERNEL_RATE=str(kernel_rate), GRAPHS="0", AUTOTUNED="0")
    if efficient_ms is None:
        env.update(ONLY_CUDNN="1")
    else:
        env.update(EFFICIENT_MS=str(efficient_ms), FLEX_MS=str(flex_ms), VARLEN_MS=str(varlen_ms))
    suite = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.sh"
    done = subprocess.run(["bash", str(suite), "first", "600"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    log = (out / "suite.log").read_text()
    steps = re.findall(r"^== (\w+) \((\d+) s left\)", log, re.M)
    names = [name for name, _ in steps]
    other = ["infer_kernel"] if tried else []
    profile = ["profile"] if profiled else []
    assert names == ["attention", "infer", *other, "peft", "pretrain", "bf16", "tests", *profile]
    assert int(steps[0][1]) == 120  # the attention benchmark is capped, the rest share the budget
    *lines, last = calls.read_text().splitlines()
    assert len(lines) == len(steps) and "-m benchmarks.targets" in last  # the verdict table at the end
    held = [line for line in lines if "--attention-kernel" in line]
    # the other kernel's inference rows, then bf16 and the profile on the kernel the network keeps
    assert [line.split("--attention-kernel ")[1].split()[0] for line in held] == (
        [tried] * bool(tried) + [kept] * (1 + profiled)
    )
    assert len(list(out.iterdir())) <= 8


@pytest.mark.parametrize("part", ["tests", "infer", "train", "e2e", "full", "cudagraphs", "autotune"])
def test_every_part_of_the_gpu_suite_leaves_at_most_8_files(part, tmp_path):
    """The device tool returns at most 8 files of a call: every part's steps, each writing its
    file (a stand-in python), and suite.log stay within that."""
    import os
    import stat
    import subprocess
    import sys

    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out, calls = tmp_path / "out", tmp_path / "calls.txt"
    env = dict(os.environ, PYTHON=str(fake), REAL_PYTHON=sys.executable, OUT=str(out), CALLS=str(calls))
    env.update(COMPILED="7834", GRAPHS="9000", AUTOTUNED="11000")
    suite = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.sh"
    done = subprocess.run(["bash", str(suite), part, "600"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    steps = re.findall(r"^== (\w+) \(\d+ s left\)", (out / "suite.log").read_text(), re.M)
    *lines, last = calls.read_text().splitlines()
    assert steps and len(lines) == len(steps) and "-m benchmarks.targets" in last
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == len(set(files)) and len(files) <= 8, files
    assert len(files) == len(steps) + 1  # one file per step, and the log


def test_the_kernel_count_reads_inductor_s_generated_code():
    """benchmarks/kernel_count.py counts launches in the code inductor generates: a matrix product
    with a bias, then two elementwise operations (fused into one kernel), then a batched product."""
    from torch._inductor.utils import run_and_get_code

    from benchmarks.kernel_count import count_launches

    def fn(x, w, b, y):
        h = torch.nn.functional.linear(x, w, b).relu() * 2
        return h.view(4, 2, 3) @ y

    torch.compiler.reset()
    args = (torch.randn(8, 5), torch.randn(3, 5), torch.randn(3), torch.randn(4, 3, 6))
    out, codes = run_and_get_code(torch.compile(fn), *args)
    torch.testing.assert_close(out, fn(*args))
    counts = count_launches("\n".join(codes))
    assert counts["addmm"] == 1 and counts["bmm"] == 1 and counts["fused"] >= 1, counts
    assert sum(counts.values()) == counts["addmm"] + counts["bmm"] + counts["fused"], counts


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # on purpose, below
@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_the_attention_benchmark_s_ways_compute_the_network_s_attention(compiled, monkeypatch):
    """``bench_attention.py`` times the network's attention in several forms: on the CPU the masked
    padded forms and the packed one (each row's real tokens end to end) give the masked
    attention's values at every real query, so their times compare like for like. Its masks and
    packing are checked with flex_attention and ``create_block_mask`` run as they are; compiled
    as the benchmark runs them (inductor generates and builds C++ for six graphs: 25 s, 50 s
    with its cache empty), in ``make test-slow``."""
    import torch.nn.functional as F

    from benchmarks.bench_attention import attention_shapes, inputs, way_function
    from benchmarks.scenes import random_batch
    from forecast_peft.models.config import ModelConfig

    if not compiled:
        monkeypatch.setattr(torch, "compile", lambda fn, **options: fn)
    cfg = ModelConfig()
    for stage, shape in attention_shapes(random_batch(2), cfg).items():
        rows = torch.linspace(0, len(shape["real"]) - 1, 3).long().unique()  # a short test, both scenes
        shape = {**shape, "real": shape["real"][rows]}
        q, k, v, attend = inputs(shape, cfg.num_heads, cfg.embed_dim // cfg.num_heads, "cpu", dtype=torch.float32)
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=attend[:, None, None, :])
        queries = shape["real"] - (shape["keys"] - shape["queries"])  # each row's real queries
        assert int(queries.min()) < shape["queries"]  # some padding to leave out
        for way in ("sdpa_math", "flex_padded", "flex_packed"):
            got = way_function(way, q, k, v, attend)()
            if way == "flex_packed":  # [1, H, sum of real queries, d]: back to rows
                got = got[0].split(queries.tolist(), dim=1)
            for row, n in enumerate(queries.tolist()):
                label = f"{stage} {way} row {row}"
                torch.testing.assert_close(got[row][:, :n], want[row, :, :n], rtol=1e-4, atol=1e-5, msg=label)


def test_the_targets_table_says_which_of_the_issues_figures_the_rows_meet(tmp_path, capsys):
    """``benchmarks/targets.py``: per target of #8, the best batch-128 row of its task (peak memory:
    the fastest PEFT row's), met or not, on the device the row names; a target no row measures is
    said to be so, and files of other kinds are passed over."""
    from benchmarks import targets

    def row(task, rate, batch=128, mem=None):
        return {"task": task, "batch": batch, "scenes_per_s": rate, "peak_mem_gb": mem, "gpu": "NVIDIA H200"}

    rows = [row("peft", 1900.0, mem=5.0), row("peft", 2100.0, mem=8.0), row("peft", 9000.0, batch=32, mem=1.0)]
    rows += [row("infer", 10400.0), row("infer_sorted", 20000.0), row("pretrain", 1400.0, batch=32)]
    (tmp_path / "bench.json").write_text(json.dumps(rows))
    (tmp_path / "attention.json").write_text(json.dumps([{"way": "sdpa_cudnn", "ms": 1.0}]))
    (tmp_path / "bf16.json").write_text(json.dumps({"minFDE6_rel_diff": -0.02, "device": "NVIDIA H200"}))
    (tmp_path / "suite.log").write_text("== infer: exit 0")
    lines = {v["target"]: v for v in targets.verdicts(*targets.read(sorted(tmp_path.iterdir())))}
    assert (lines["PEFT tuning"]["measured"], lines["PEFT tuning"]["met"]) == (2100.0, True)
    assert (lines["PEFT peak memory"]["measured"], lines["PEFT peak memory"]["met"]) == (8.0, False)
    assert lines["MAE pre-training"]["measured"] is None and lines["MAE pre-training"]["met"] is None  # batch 32 only
    assert (lines["inference"]["measured"], lines["inference"]["met"]) == (10400.0, True)
    assert lines["bf16 minFDE6 against fp32"]["met"] is False  # 2% off, in either direction
    assert "NVIDIA H200" in lines["inference"]["row"]
    table = targets.table(list(lines.values()))
    assert "| PEFT peak memory | at most 7.6 | 8.0 | NOT met |" in table
    assert "| MAE pre-training | at least 1500 | - | not measured | - |" in table


def test_the_cli_benchmark_times_answers_and_refuses_a_wrong_one(tmp_path):
    """``make bench-cli`` times fresh processes, and each must end with its exit code and say what
    it was asked: a command that answers otherwise stops the benchmark instead of being timed."""
    import subprocess
    import sys

    from benchmarks import bench_cli

    out = tmp_path / "cli.json"
    command = [sys.executable, "-m", "benchmarks.bench_cli", "--repeats", "1", "--only", "help,unknown_key"]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([*command, "--out", str(out)], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["commands"]
    assert set(rows) == {"help", "unknown_key"} and all(r["seconds_median"] > 0 for r in rows.values())
    assert rows["unknown_key"]["command"] == "fpeft tune lr=1"
    with pytest.raises(SystemExit, match="exit 2, expected 0"):
        bench_cli.time_command(["tune", "lr=1"], 0, "did you mean", 1, tmp_path)


def test_the_convert_benchmark_s_drive_becomes_the_scenarios_it_counts(tmp_path, capsys):
    from benchmarks.bench_data import bench_convert

    row = bench_convert(tmp_path, minutes=0.5, alive=12)  # 300 steps: windows at 0 and 110, or every 20 steps
    assert row["convert_back_to_back_scenarios"] == 2 and row["convert_map_lanes"] == 1680
    assert 10 < row["convert_every_2s_6_focal_scenarios"] <= 10 * 6
    assert len(list((tmp_path / "every_2s_6_focal" / "train").iterdir())) == row["convert_every_2s_6_focal_scenarios"]
    assert row["convert_every_2s_6_focal_scenarios_per_s"] > 0
    for by in ("turn", "speed_change", "interaction"):  # other focal agents, as many of them
        assert row[f"convert_every_2s_6_focal_by_{by}_scenarios"] == row["convert_every_2s_6_focal_scenarios"]
    assert "left out" not in capsys.readouterr().err  # every row of the drive is read


def test_the_forecasts_benchmark_reads_back_every_scenario_it_wrote(tmp_path, monkeypatch):
    """``make bench-forecasts`` times the reading of files that hold every scenario it made, in
    both formats, and the table it writes reads back as the submission's forecasts."""
    import sys

    from benchmarks import bench_forecasts
    from forecast_peft.forecast_files import forecast_table, read_forecasts, write_table

    out = tmp_path / "forecasts.json"
    monkeypatch.setattr(sys, "argv", ["bench_forecasts", "--scenarios", "12", "--repeats", "1", "--out", str(out)])
    bench_forecasts.main()
    result = json.loads(out.read_text())
    for name in ("submission", "table"):
        assert result[name]["rows"] == 12 and result[name]["read_s"] > 0 and result[name]["file_mb"] >= 0
    predictions = bench_forecasts.forecasts(5)
    write_table(forecast_table(predictions), tmp_path / "t.csv.gz")
    found = read_forecasts(tmp_path / "t.csv.gz")
    for sid, (probs, tracks) in predictions.items():
        ((track, modes),) = tracks.items()
        row = found.rows[(sid, track)]
        order = np.argsort(-probs, kind="stable")
        np.testing.assert_array_equal(found.world[row], modes[order])  # CSV's shortest round-trip digits
        np.testing.assert_allclose(found.probs[row], probs[order], rtol=1e-12)
