#!/usr/bin/env bash
# The GPU measurements of the speed issue, grouped so that each part fits one device call
# (600 s): every step runs with what is left of the part's time budget, so a slow compile
# costs the steps after it, never the files already written. Needs torch and numpy; the e2e
# part also pytorch-lightning, pandas and tqdm (no hydra, no av2). DEVICE=cpu runs bench_train on
# the CPU (to try the script itself: it takes far longer there).
#
#   bash benchmarks/gpu_suite.sh first|tests|infer|train|e2e|full|cudagraphs|autotune|deploy [budget_s]
#
# A session's device time is 15 minutes, its machine's start included: one call of `first` (the
# figures the issue still lacks, most wanted first) fits it; the other parts are for later calls.
#
# Files (at most 8 per part, as the device tool returns them) go to $OUT when it is set,
# else to benchmarks/results/gpu/; suite.log holds every step's command, output and exit code,
# and at its end #8's targets against the call's rows (benchmarks/targets.py).
set -u
part=${1:?usage: gpu_suite.sh first|tests|infer|train|e2e|full|cudagraphs|autotune|deploy [budget_s]}
budget=${2:-570}
py=${PYTHON:-python3}
out=${OUT:-benchmarks/results/gpu}
bench=(-m benchmarks.bench_train --device "${DEVICE:-cuda}" --batches 128 --precisions bf16)
mkdir -p "$out"
export PYTHONUNBUFFERED=1
t0=$(date +%s)

step() {  # step NAME COMMAND...: COMMAND under what is left of the budget (at most $cap s when
    # the call sets cap)
    local name=$1 left rc
    shift
    left=$((budget - ($(date +%s) - t0)))
    if ((${cap:-0} > 0 && cap < left)); then
        left=$cap
    fi
    if ((left < 30)); then
        echo "== $name: skipped, ${left} s of the budget left" | tee -a "$out/suite.log"
        return
    fi
    echo "== $name ($left s left): $*" | tee -a "$out/suite.log"
    timeout "$left" "$@" >>"$out/suite.log" 2>&1
    rc=$?
    echo "== $name: exit $rc after $(($(date +%s) - t0)) s" | tee -a "$out/suite.log"
}

target_met() {  # target_met FILE...: a batch-128 infer row of one of them meets #8's inference
    # target (benchmarks/targets.py: 10,000 scenes/s)
    "$py" -c 'import sys
from benchmarks.targets import met
sys.exit(0 if met(sys.argv[1:], "inference") else 1)' "$@" 2>/dev/null
}

faster_infer() {  # faster_infer A B: A has an infer row, faster than B's (or B has none)
    "$py" -c 'import json, os, sys
def rate(path):
    rows = json.load(open(path)) if os.path.exists(path) else []
    return max((r["scenes_per_s"] for r in rows if r.get("task") == "infer"), default=None)
a, b = rate(sys.argv[1]), rate(sys.argv[2])
sys.exit(0 if a is not None and (b is None or a > b) else 1)' "$1" "$2" 2>/dev/null
}

fastest_kernel() {  # fastest_kernel FILE: of the attention kernels the network may be held to
    # instead of torch's (cuDNN's), efficient, math, flex and varlen, the one bench_attention timed
    # fastest on the decoder's random batch (the network's largest attention), whether or not it
    # beats cuDNN's there: the whole pass decides (varlen also drops the unpacking, and cuDNN
    # builds a plan per new shape); nothing if none has a time
    "$py" -c 'import json, sys
kernels = {"sdpa_efficient": "efficient", "sdpa_math": "math", "flex_padded": "flex", "varlen_packed": "varlen"}
rows = [r for r in json.load(open(sys.argv[1])) if r["stage"] == "decoder" and r["batches"] == "random"]
ms = {kernels[r["way"]]: r["ms"] for r in rows if r["way"] in kernels and r.get("ms")}
print(min(ms, key=ms.get) if ms else "")' "$1" 2>/dev/null
}

cudagraphs() {  # cudagraphs TASKS: inference with CUDA graphs, on batches in the fixed shapes fpeft eval
    # forms for them
    step cudagraphs "$py" "${bench[@]}" --compile-mode reduce-overhead --tasks "$1" --out "$out/infer_cudagraphs.json"
}

case $part in
first)  # one call of a 15-minute session: the figures #8's targets still lack, most wanted first
    # (at most 8 files). Session 26 (H200): compiled inference 9,823 scenes/s, a third of its
    # kernel time in cuDNN's attention; the compiled PEFT step failed in inductor (fixed since:
    # inductor_options). Session 27 (no GPU): infer_sorted rows time each batch shape's first step
    # apart (scenes_per_s_new_shapes: cuDNN builds a plan per attention shape), and Dynamo traces
    # each network once, not twice (shorter compiles for every step). Session 28 (no GPU): the
    # batches' slots are rounded up to multiples of 8 (data.slot_multiple), as fpeft's loaders now
    # round them, so a split brings few attention shapes. In order: the attention
    # alone in every form (120 s); inference compiled as it is and held to the fastest other
    # kernel the attention benchmark timed (efficient, math, flex or varlen); PEFT training (rate,
    # peak memory); pre-training; bf16 against fp32 on the faster of the two (compiled); the CUDA
    # checks of the kernels, FT's gradients and the no-sync steps; if no inference row meets the
    # target, a profile of the faster network (into suite.log). FT (no target of its own)
    # and the end-to-end loops are the train and e2e parts'.
    cap=120 step attention "$py" -m benchmarks.bench_attention --out "$out/attention.json"
    step infer "$py" "${bench[@]}" --compile --tasks infer,infer_sorted --out "$out/infer.json"
    kernel=$(fastest_kernel "$out/attention.json")
    if [ -n "$kernel" ]; then
        step infer_kernel "$py" "${bench[@]}" --compile --attention-kernel "$kernel" --tasks infer,infer_sorted \
            --out "$out/infer_kernel.json"
        # bf16 and the profile take the faster network (the kernel's run failed: the network as it is)
        if ! faster_infer "$out/infer_kernel.json" "$out/infer.json"; then
            kernel=auto
        fi
    else
        kernel=auto
        echo "== infer_kernel: skipped, the attention benchmark timed no other kernel" | tee -a "$out/suite.log"
    fi
    step peft "$py" "${bench[@]}" --compile --tasks peft --out "$out/peft.json"
    step pretrain "$py" "${bench[@]}" --compile --tasks pretrain --out "$out/pretrain.json"
    step bf16 "$py" -m benchmarks.check_bf16 --compile --attention-kernel "$kernel" --out "$out/bf16_check.json"
    # the CUDA checks sessions 26 and 27 changed or added (the whole file: the tests part)
    step tests "$py" -m pytest -q -m "gpu and not autotune" -p no:cacheprovider tests/test_gpu.py \
        -k "attention_kernels or training_step_on_cuda or synchronise" --junitxml="$out/gpu_tests.xml"
    if target_met "$out/infer.json" "$out/infer_kernel.json"; then
        echo "== profile: skipped, inference met its target" | tee -a "$out/suite.log"
    else
        step profile "$py" -m benchmarks.profile_gpu --task infer --compile --attention-kernel "$kernel"
    fi
    ;;
tests)  # the CUDA correctness checks (tests/test_gpu.py, marker gpu): the CPU's values, no host
    # waits in a bf16 step (CUDA's sync detector), compiled graphs, a bf16-mixed Lightning fit
    step tests "$py" -m pytest -q -m "gpu and not autotune" -p no:cacheprovider tests/test_gpu.py --junitxml="$out/gpu_tests.xml"
    ;;
infer)  # the one target not met yet, and bf16's accuracy on the current code; whether skipping
    # padding pays on the user's path (size-ordered batches); where the time goes (the first
    # step's graph again, which inductor's on-disk cache may shorten); the launches of a pass and
    # whether folding the adapters pays; whether rounding slots up (data.slot_multiple) pays
    step infer "$py" "${bench[@]}" --compile --tasks infer,infer_sorted --out "$out/infer.json"
    step bf16 "$py" -m benchmarks.check_bf16 --out "$out/bf16_check.json"  # bf16 within 1% of fp32, current code
    # session 28: slots rounded up to multiples of 8 (data.slot_multiple), fewer shapes for cuDNN's
    # plans; the size-ordered rate without the rounding, new shapes and steady
    step unrounded "$py" "${bench[@]}" --compile --tasks infer_sorted --slot-multiple 1 \
        --out "$out/infer_sorted_unrounded.json"
    step padded "$py" "${bench[@]}" --compile --tasks infer_sorted --padded-blocks \
        --out "$out/infer_sorted_padded_blocks.json"
    step profile "$py" -m benchmarks.profile_gpu --task infer --compile --out "$out/profile_infer.txt"
    # session 25: fpeft eval folds the adapters into the layers beside them (284 -> 200 launches
    # on the CPU); the kernels a GPU pass launches in each form, and the rate of the unfolded form
    step kernels "$py" -m benchmarks.kernel_count --out "$out/kernel_count.json"
    step unfolded "$py" "${bench[@]}" --compile --tasks infer --unfolded-adapters --out "$out/infer_unfolded.json"
    ;;
train)  # one compile each: session 1's run lost FT to the time limit after three others
    step peft "$py" "${bench[@]}" --compile --tasks peft --out "$out/peft.json"
    step pretrain "$py" "${bench[@]}" --compile --tasks pretrain --out "$out/pretrain.json"
    step ft "$py" "${bench[@]}" --compile --tasks ft --out "$out/ft.json"
    ;;
e2e)  # real loops fed by the cache through DataLoader workers
    step e2e_peft "$py" -m benchmarks.e2e_epoch --scenes 16384 --workers 8 --compile --no-progress \
        --out "$out/e2e_compiled.json"
    step e2e_infer "$py" -m benchmarks.e2e_epoch --task infer --scenes 32768 --workers 12 --compile --no-progress \
        --out "$out/e2e_infer.json"
    # pre-training samples its masks on the host, in the main process, before each transfer
    step e2e_pretrain "$py" -m benchmarks.e2e_epoch --task pretrain --scenes 16384 --workers 8 --compile \
        --no-progress --out "$out/e2e_pretrain.json"
    ;;
full)  # the whole table on the current code, eager (no compile): every task at batch 32
    # and 128, fp32 and bf16
    step full "$py" -m benchmarks.bench_train --device "${DEVICE:-cuda}" --out "$out/eager_full.json"
    ;;
cudagraphs)  # if inference stays under 10,000 scenes/s: the benchmark, then fpeft eval's own loop;
    # then the other way to cut the host's work per launch, on any batch shape: inductor's C++
    # wrapper instead of its Python one (session 25; works on the CPU with dynamic shapes)
    cudagraphs infer,infer_sorted
    step e2e_cudagraphs "$py" -m benchmarks.e2e_epoch --task infer --scenes 32768 --workers 12 \
        --compile-mode reduce-overhead --no-progress --out "$out/e2e_infer_cudagraphs.json"
    step cpp_wrapper "$py" "${bench[@]}" --cpp-wrapper --tasks infer,infer_sorted --out "$out/infer_cpp_wrapper.json"
    ;;
autotune)  # compile_mode=max-autotune-no-cudagraphs, which tune, pretrain and eval take: whether it
    # gives the eager values over several batch shapes on a GPU (on the CPU it failed at the second:
    # fpeft compiles it as the default mode there), then whether trying kernel variants while
    # compiling (a longer compile) pays in inference and PEFT training
    mat=(--compile-mode max-autotune-no-cudagraphs)
    step autotune_tests "$py" -m pytest -q -m autotune -p no:cacheprovider tests/test_gpu.py \
        --junitxml="$out/gpu_autotune_tests.xml"
    step autotune_infer "$py" "${bench[@]}" "${mat[@]}" --tasks infer --out "$out/infer_autotune.json"
    step autotune_peft "$py" "${bench[@]}" "${mat[@]}" --tasks peft --out "$out/peft_autotune.json"
    ;;
deploy)  # fpeft deploy on the GPU: export (its checks against the network there) and the time per batch
    # of the network, the exported program and, compiled last, the AOTInductor package
    step deploy "$py" -m benchmarks.bench_deploy --device "${DEVICE:-cuda}" --batches 1,32,128 --no-aoti \
        --precisions 32,bf16 --out "$out/deploy.json"
    step deploy_aoti "$py" -m benchmarks.bench_deploy --device "${DEVICE:-cuda}" --batches 1,32,128 \
        --precisions 32,bf16 --out "$out/deploy_aoti.json"
    ;;
*)
    echo "unknown part '$part': first, tests, infer, train, e2e, full, cudagraphs, autotune or deploy" >&2
    exit 2
    ;;
esac
# #8's targets against this call's rows, at the end of suite.log (a second or two, after the budget)
echo "== targets" >>"$out/suite.log"
"$py" -m benchmarks.targets "$out"/*.json >>"$out/suite.log" 2>&1
