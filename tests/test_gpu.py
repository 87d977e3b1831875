"""Checks that need a CUDA device (marker ``gpu``): ``make test-gpu``, or on the device machine
``bash benchmarks/gpu_suite.sh tests``. They read AV2-sized random scenes
(``benchmarks/scenes.py``), so they run without av2 and hydra.

What the CPU suite cannot see: the CUDA kernels give the CPU's values, a training or inference
step never makes the host wait for the GPU (CUDA's own sync detector, not the CPU recorder of
tests/host_sync.py), compiled CUDA graphs give the eager values, and a Lightning fit with bf16
mixed precision gets its pre-training masks from pinned memory."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.apply_func import move_data_to_device
from torch.utils.data import DataLoader

from benchmarks.scenes import random_batch, random_scene
from forecast_peft.data.dataset import collate_scenes
from forecast_peft.lit.modules import ForecastModule, MAEModule
from forecast_peft.metrics import ForecastMetrics
from forecast_peft.models.compile import compilations, maybe_compile
from forecast_peft.models.layers import set_attention_kernel
from forecast_peft.models.mae import MAE_MASKS
from forecast_peft.peft.fold import fold_adapters
from tests.test_host_sync import OPTIM, forward_backward, host_batch, make_module
from tests.test_models import tiny

CUDA = torch.device("cuda")
TASKS = ["pretrain", "tpp", "peft", "ft", "baseline"]

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture
def full_fp32():
    """fp32 matrix products and convolutions without TF32 while a test compares against the CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    """``a`` within ``rel`` of ``b`` in relative norm (summation orders differ between devices)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm()) <= rel * float(b.norm()) + 1e-7


# not tpp: it draws one mode's prompts per scene on the device, from the device's own generator
@pytest.mark.parametrize("task", ["pretrain", "peft", "ft", "baseline"])
def test_training_step_on_cuda_gives_the_cpu_values(task, full_fp32):
    torch.manual_seed(0)
    cpu = make_module(task).train()
    gpu = copy.deepcopy(cpu).to(CUDA)
    batch = host_batch(task)
    # both score the CPU's winning modes: the untrained modes lie within 1e-6 of each other, so
    # rounding would pick each device's own (ft's gradients then differed by 5% on an H200)
    winners: list = []
    loss_cpu = forward_backward(cpu, batch, winners)
    loss_gpu = forward_backward(gpu, move_data_to_device(batch, CUDA), winners)
    assert close(loss_gpu.cpu(), loss_cpu)
    checked = 0
    for (name, p), q in zip(cpu.model.named_parameters(), gpu.model.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert close(q.grad.cpu(), p.grad, 1e-3), name
            checked += 1
    assert checked > 0


def _in_sync_error_mode(fn) -> None:
    """Run ``fn`` with CUDA raising an error at any operation that makes the host wait."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_the_cuda_sync_check_can_fail():
    x = torch.arange(4, device=CUDA)
    for syncing in (lambda: x.nonzero(), lambda: x.sum().item(), lambda: x[x > 1]):
        with pytest.raises(RuntimeError, match="synchroniz"):
            _in_sync_error_mode(syncing)


# ``varlen`` too: its row starts and the memory keys' layout are computed on the device
@pytest.mark.parametrize("kernel", ["auto", "varlen"])
@pytest.mark.parametrize("task", TASKS)
def test_bf16_training_steps_do_not_synchronise_on_cuda(task, kernel):
    torch.manual_seed(0)
    module = make_module(task).to(CUDA).train()
    set_attention_kernel(module.model, kernel)
    params = [p for p in module.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    batches = [move_data_to_device(host_batch(task, seed=s), CUDA) for s in range(3)]
    losses = []

    def train_step(batch: dict) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses.append(forward_backward(module, batch).detach())
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    train_step(batches[0])  # first use: allocations, library handles, the optimiser's state
    _in_sync_error_mode(lambda: [train_step(b) for b in batches[1:]])
    assert torch.isfinite(torch.stack(losses)).all()


@pytest.mark.parametrize("kernel", ["auto", "varlen"])
@pytest.mark.parametrize("mode", ["peft", "ft", "baseline"])
def test_bf16_inference_and_metrics_do_not_synchronise_on_cuda(mode, kernel):
    model = make_module(mode).model.to(CUDA).eval()
    set_attention_kernel(model, kernel)
    metrics = ForecastMetrics().to(CUDA)
    batches = [move_data_to_device(random_batch(6, seed=s), CUDA) for s in range(3)]

    def infer(batch: dict) -> None:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(batch)
        metrics.update(out["y_hat"].float(), out["pi"].float(), batch["y"][:, 0])

    infer(batches[0])
    _in_sync_error_mode(lambda: [infer(b) for b in batches[1:]])
    assert int(metrics.count) == 18
    assert all(torch.isfinite(v) for v in metrics.compute().values())


AUTOTUNED = [pytest.param(t, "max-autotune-no-cudagraphs", marks=pytest.mark.autotune) for t in ("pretrain", "peft")]


@pytest.mark.parametrize("task,mode", [("pretrain", None), ("peft", None), *AUTOTUNED])
def test_compiled_model_on_cuda_gives_the_eager_values(task, mode, full_fp32):
    """Four batch shapes through the dynamic-shape compilation of the stages' ``compile=true``:
    the eager values (PEFT: of the unfolded model, from the folded one that eval compiles), and
    fewer compilations than shapes (inductor may add one where a batch crosses a size threshold of
    its kernels, see tests/test_dynamic_shapes.py). With
    ``compile_mode=max-autotune-no-cudagraphs`` too (marker ``autotune``, `gpu_suite.sh
    autotune`: tuning takes minutes), whose CPU templates failed at the second batch size."""
    torch.manual_seed(0)
    eager = make_module(task).model.to(CUDA)
    eager.train() if task == "pretrain" else eager.eval()
    # PEFT inference as fpeft eval runs it: the adapters folded in (peft.fold)
    compiled = copy.deepcopy(eager) if task == "pretrain" else fold_adapters(eager)
    torch.compiler.reset()
    before = compilations()
    maybe_compile(compiled, True, mode)
    shapes = ((6, 0), (9, 1), (4, 2), (7, 4))  # 61, 56, 57 and 54 actor slots
    for size, seed in shapes:
        batch = move_data_to_device(host_batch(task, size, seed), CUDA)
        with torch.no_grad():
            want, got = eager(batch), compiled(batch)
        keys = ["loss"] if task == "pretrain" else ["y_hat", "pi"]
        for key in keys:
            assert close(got[key], want[key]), (key, size)
    assert compilations() - before < len(shapes)


@pytest.mark.parametrize("kernel", ["efficient", "flex", "varlen"])
def test_attention_kernels_on_cuda_give_the_default_forecasts(kernel):
    """A folded PEFT network held to each attention kernel that ``bench_train.py
    --attention-kernel`` times (``set_attention_kernel``), compiled with dynamic shapes, in bf16 as
    the benchmark runs it: the forecasts of the default kernel's network over three batch shapes,
    and a training step's gradients (FlashAttention's variable-length kernel for ``varlen``)."""

    torch.manual_seed(0)
    module = make_module("peft")
    reference = fold_adapters(module.model.to(CUDA).eval())
    held = copy.deepcopy(reference)
    set_attention_kernel(held, kernel)
    torch.compiler.reset()
    maybe_compile(held, True)
    for size, seed in ((6, 0), (9, 1), (4, 2)):
        batch = move_data_to_device(host_batch("peft", size, seed), CUDA)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            want, got = reference(batch), held(batch)
        for key in ("y_hat", "pi"):
            assert close(got[key], want[key], 2e-2), (key, size)
    if kernel != "flex":  # training: the gradients of the default kernel's (flex trains only compiled)
        train = module.train()
        batch = move_data_to_device(host_batch("peft", 6, 0), CUDA)
        winners: list = []
        grads = []
        for name in ("auto", kernel):
            set_attention_kernel(train.model, name)
            train.model.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                forward_backward(train, batch, winners)
            grads.append([p.grad.clone() for p in train.model.parameters() if p.grad is not None])
        for a, b in zip(*grads, strict=True):
            assert close(b, a, 5e-2)


def test_inference_with_cuda_graphs_on_fixed_shapes_gives_the_eager_values(full_fp32, monkeypatch):
    """``fpeft eval compile_mode=reduce-overhead``: batches in fixed shapes (``static``), CUDA
    graphs recorded once per shape and then replayed, none skipped, the eager forecasts, and each
    batch's forecasts intact after the graph has run again (``model_predictor`` copies them). PEFT
    only: a GPU session's minutes are few, and FT runs the same network."""
    from torch._inductor.cudagraph_trees import CUDAGraphTreeManager

    from forecast_peft.evaluation import model_predictor
    from forecast_peft.models.compile import cudagraph_skips

    torch.manual_seed(0)
    eager = make_module("peft").model.to(CUDA).eval()
    graphs = fold_adapters(eager)  # as fpeft eval runs it
    torch.compiler.reset()
    recorded = []
    record = CUDAGraphTreeManager.record_function
    monkeypatch.setattr(
        CUDAGraphTreeManager, "record_function", lambda s, *a, **k: recorded.append(1) or record(s, *a, **k)
    )
    skips = cudagraph_skips()
    maybe_compile(graphs, True, "reduce-overhead")
    run_eager, run_graphs = model_predictor(eager), model_predictor(graphs, cuda_graphs=True)
    rng = np.random.default_rng(0)
    batches = [
        move_data_to_device(collate_scenes([random_scene(rng, i) for i in range(6)], static=True), CUDA)
        for _ in range(6)
    ]
    shapes = {(b["x"].shape[1], b["lane_positions"].shape[1]) for b in batches}
    assert 1 < len(shapes) < len(batches)  # shapes repeat: later batches replay earlier graphs
    # each shape runs once plain, then records; a third round only replays (inductor may record a
    # graph per partition of the network, so the count is checked for growth, not against shapes)
    got = [run_graphs(b) for b in batches + batches]
    recorded_in_two_rounds = len(recorded)
    got += [run_graphs(b) for b in batches]
    assert 0 < recorded_in_two_rounds == len(recorded)
    for batch, (y_hat, pi) in zip(batches * 3, got):
        want_y, want_pi = run_eager(batch)
        assert close(y_hat, want_y) and close(pi, want_pi)
    assert cudagraph_skips() == skips


class _PinCheckedMAEModule(MAEModule):
    """Records whether each batch's masks were in pinned memory before the transfer, and on the
    GPU at the training step."""

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        batch = super().on_before_batch_transfer(batch, dataloader_idx)
        self.seen.append(("pinned", all(v.is_pinned() for v in batch[MAE_MASKS].values())))
        return batch

    def training_step(self, batch, batch_idx):
        self.seen.append(("on cuda", all(v.is_cuda for v in batch[MAE_MASKS].values())))
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("task", ["pretrain", "peft"])
def test_lightning_fit_on_cuda_with_bf16_mixed_precision(task, tmp_path):
    rng = torch.Generator().manual_seed(0)
    scenes = [random_scene(np.random.default_rng(s), s) for s in range(48)]
    loader = dict(batch_size=8, collate_fn=collate_scenes, num_workers=2, pin_memory=True)
    train = DataLoader(scenes[:32], shuffle=True, generator=rng, **loader)
    val = DataLoader(scenes[32:], **loader)
    if task == "pretrain":
        module = _PinCheckedMAEModule(tiny().to_dict(), OPTIM)
        module.seen = []
    else:
        module = ForecastModule(tiny().to_dict(), task, OPTIM)
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train, val)
    assert trainer.global_step == 8
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["val/loss"])
    if task == "pretrain":
        # the training batches (and the sanity check's and validation's, which are not trained on)
        assert ("on cuda", True) in module.seen and ("on cuda", False) not in module.seen
        assert ("pinned", False) not in module.seen and module.seen.count(("on cuda", True)) == 8
    else:
        assert torch.isfinite(metrics["val/minFDE6"])


def test_an_allocation_the_gpu_has_no_room_for_is_one_line():
    """torch's own words for a CUDA out-of-memory error on this torch (tests/test_pipeline.py
    uses torch 2.x's wording): the line keeps what was wanted and what was free."""
    import re

    from forecast_peft.errors import UserError, gpu_memory_advice

    total = torch.cuda.mem_get_info()[1]
    with pytest.raises(UserError) as err, gpu_memory_advice("lower data.batch_size (now 128)"):
        torch.empty(total * 2, dtype=torch.uint8, device=CUDA)
    size = r"[\d.]+ [KMGT]?i?B"
    wanted = rf"\(tried to allocate {size}; GPU \d+ had {size} free of {size}\)"
    line = str(err.value)
    assert re.fullmatch(rf"out of GPU memory {wanted}: lower data.batch_size \(now 128\)", line), line


@pytest.mark.parametrize("mode", ["peft", "baseline"])
def test_a_network_deployed_on_cuda_forecasts_as_the_cpu_s_program(mode, full_fp32):
    """`fpeft deploy device=cuda`: the program traced on the GPU (its checks against the network
    there pass) gives the CPU program's forecasts on the same scenes of other sizes."""
    from forecast_peft.deploy import _by_mode, example_inputs, export
    from forecast_peft.evaluation import inference_network

    torch.manual_seed(0)
    network = inference_network(make_module(mode).model).eval()
    cpu_program, _ = export(copy.deepcopy(network), torch.device("cpu"))
    gpu_program, checks = export(copy.deepcopy(network).to(CUDA), CUDA)
    assert max(c["max_diff_m"] for c in checks) < 1e-3
    inputs = example_inputs(7, 41, 130, "cpu", seed=5)
    with torch.no_grad():
        want_xy, want_p, want_modes = cpu_program.module()(*inputs)
        xy, p, modes = gpu_program.module()(*[t.to(CUDA) for t in inputs])
    assert xy.device.type == "cuda"
    # in the network's order of modes: an untrained network's near-equal probabilities may sort
    # differently on the two devices
    xy, p, modes = xy.cpu(), p.cpu(), modes.cpu()
    assert close(_by_mode(xy, modes), _by_mode(want_xy, want_modes))
    assert close(_by_mode(p, modes), _by_mode(want_p, want_modes))


def test_a_bf16_program_on_cuda_computes_its_network_under_autocast():
    """`fpeft deploy device=cuda --precision bf16`: the program's checks against the network in
    bf16 on the GPU pass, and its forecasts are bfloat16's rounding away from the float32
    program's (so autocast runs inside it), no farther than that rounding allows."""
    from forecast_peft.deploy import MAX_DIFF_M, _by_mode, example_inputs, export
    from forecast_peft.evaluation import inference_network

    torch.manual_seed(0)
    network = inference_network(make_module("peft").model).eval().to(CUDA)
    program, checks = export(copy.deepcopy(network), CUDA, "bf16")
    float32, _ = export(copy.deepcopy(network), CUDA)
    assert all(c["max_diff_m"] <= MAX_DIFF_M and c["bf16_rounding_m"] > 1e-4 for c in checks), checks
    inputs = [t.to(CUDA) for t in example_inputs(7, 41, 130, "cpu", seed=5)]
    with torch.no_grad():
        (xy, _, modes), (want_xy, _, want_modes) = program.module()(*inputs), float32.module()(*inputs)
    assert xy.dtype == torch.float32
    diff = (_by_mode(xy, modes) - _by_mode(want_xy, want_modes)).abs().max()
    assert 1e-4 < diff < 0.5
