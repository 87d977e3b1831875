"""``compile=true`` compiles each network once for every batch shape (``torch.compile`` with
dynamic shapes): a new number of scenes, actor slots or lanes must not recompile it. A real split
brings a new shape at almost every batch, and after 8 recompilations torch stops compiling and
runs the network eagerly. Traced here without code generation, so that it takes seconds: backend
``eager`` (Dynamo's shape guards) and, in ``make test-slow``, ``aot_eager`` for training, which
traces the backward too. Inductor adds guards of its own on size thresholds where its kernels
change form (seen on the CPU: history rows x 50 > 4096), so it may compile once more when a
batch crosses one: a bounded number of times, not once per shape."""

import pytest
import torch

from forecast_peft.models.compile import compile_forward
from tests.test_host_sync import host_batch, make_module


def case(task: str) -> tuple[str, bool, str | None]:
    """A case's name (``peft``, ``peft_folded``, ``pretrain_varlen``, ``peft_folded_flex``) as the
    module's task, whether its adapters are folded, and the attention kernel it is held to."""
    kernel = next((k for k in ("varlen", "flex") if task.endswith(f"_{k}")), None)
    base = task.removesuffix(f"_{kernel}") if kernel else task
    return base.removesuffix("_folded"), base.endswith("_folded"), kernel


def network(task: str) -> torch.nn.Module:
    """The model of ``task``; ``_folded``: with its adapters folded in and its prompts' projections
    computed, as ``fpeft eval`` and ``predict`` run it; ``_varlen``: held to the varlen attention
    kernel (every block's attention on its packed tokens); ``_flex``: held to flex_attention."""
    from forecast_peft.models.layers import set_attention_kernel
    from forecast_peft.peft.fold import fold_adapters

    data, folded, kernel = case(task)
    model = make_module(data).model
    if folded:
        model = fold_adapters(model)
    if kernel is not None:
        set_attention_kernel(model, kernel)
    return model


SLOW = pytest.mark.slow
CASES = [("peft", False, "eager"), ("peft_folded", False, "eager"), ("baseline", False, "eager")]
# FT trains PEFT's network with every parameter: its trace differs in what requires a gradient alone
CASES += [("peft", True, "eager"), pytest.param("ft", True, "eager", marks=SLOW)]
CASES += [("pretrain", True, "eager"), pytest.param("tpp", True, "eager", marks=SLOW)]
# the varlen kernel traced in training here; folded inference on it (11 s more) in make test-slow
CASES += [pytest.param("peft_folded_varlen", False, "eager", marks=SLOW), ("peft_varlen", True, "eager")]
CASES += [pytest.param("pretrain_varlen", True, "eager", marks=SLOW)]
# flex_attention (its block mask's sizes symbols), as eval runs it: traced for one batch's shapes
# in tests/test_models.py
CASES += [pytest.param("peft_folded_flex", False, "eager", marks=SLOW)]
CASES += [pytest.param(task, True, "aot_eager", marks=SLOW) for task in ("peft", "pretrain")]


@pytest.mark.parametrize("task,train,backend", CASES)
def test_one_compilation_serves_every_batch_shape(task, train, backend):
    torch.compiler.reset()
    model = network(task).train(train)
    forward = compile_forward(model.forward, fullgraph=True, backend=backend)
    data = case(task)[0]
    batches = [host_batch(data, size, seed) for size, seed in ((6, 0), (9, 1), (4, 2))]
    for key in ("x", "lane_positions"):  # scenes, actor slots and lane slots all change
        assert len({b[key].shape[0] for b in batches}) == len({b[key].shape[1] for b in batches}) == 3
    with torch._dynamo.config.patch(error_on_recompile=True), torch.set_grad_enabled(train):
        for batch in batches:
            out = forward(batch)
            assert torch.isfinite(out["loss" if data in ("pretrain", "tpp") else "y_hat"]).all()


@SLOW  # 16 s and more: it traces the network twice
@pytest.mark.parametrize("task,train", [("peft_folded", False), ("ft", True)])
def test_the_network_is_traced_once(task, train):
    """The modules' float settings (LayerNorm's eps, DropPath's rates) are traced as the constants
    they are: left as symbols, a pass of the compiling backends (``aot_eager`` runs it, as
    inductor does) failed to turn them into tensors and Dynamo traced the whole network again
    (compiling published-size inference on this CPU took 21.7 s instead of 12.0 with inductor's
    cache warm). So Dynamo captures as many calls for ``aot_eager`` as for ``eager``, not twice
    as many."""
    from torch._dynamo.utils import counters

    captured = {}
    for backend in ("eager", "aot_eager"):
        torch.compiler.reset()
        counters.clear()
        model = network(task).train(train)
        forward = compile_forward(model.forward, fullgraph=True, backend=backend)
        with torch.set_grad_enabled(train):
            forward(host_batch(case(task)[0], 4, 0))
        captured[backend] = counters["stats"]["calls_captured"]
    assert captured["aot_eager"] == captured["eager"] > 0


# folded FT (its prompts' keys and values beside plain blocks): what peft_folded (the prompts) and
# the baseline (plain blocks) trace between them, in make test-slow
@pytest.mark.parametrize("mode", ["peft_folded", pytest.param("ft_folded", marks=SLOW), "baseline"])
def test_fixed_shape_batches_trace_to_one_graph(mode):
    """The fixed-shape batches of a CUDA-graph ``compile_mode`` (``collate_scenes(static=True)``:
    padded layout, no real-token indices) trace to one whole graph (``fullgraph``: a break raises
    and would leave part of the network outside the CUDA graph) that serves every shape. Only
    inference loaders make such batches, and ``evaluation.inference_network`` folds what it runs
    (the baseline has nothing to fold)."""
    import numpy as np

    from benchmarks.scenes import random_scene
    from forecast_peft.data.dataset import collate_scenes

    torch.compiler.reset()
    model = network(mode).eval()
    forward = compile_forward(model.forward, fullgraph=True, backend="eager")
    rng = np.random.default_rng(0)
    batches = [collate_scenes([random_scene(rng, i) for i in range(size)], static=True) for size in (6, 9, 4)]
    assert len({(b["x"].shape[1], b["lane_positions"].shape[1]) for b in batches}) > 1
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for batch in batches:
            assert "actor_index" not in batch and torch.isfinite(forward(batch)["y_hat"]).all()


def test_sizes_that_happen_to_be_equal_in_the_first_batch_do_not_recompile():
    """torch gives sizes that are equal in the batch it traces one symbol (duck shaping): a first
    batch of 30 scenes with 30 actor slots compiled the network again at the next batch, and
    each coincidence (actor slots = 50 history steps, lanes = scenes, ...) cost another compile.
    ``compile_forward`` gives each size its own symbol. Batches cloned, as on a GPU (no views);
    the baseline's network, the quickest to trace, since the sizes are the batch's."""
    import numpy as np

    from benchmarks.scenes import random_scene
    from forecast_peft.data.dataset import collate_scenes

    rng = np.random.default_rng(0)
    pool = [random_scene(rng, i) for i in range(300)]

    def batch(scenes: int, slots: int) -> dict:
        chosen = [s for s in pool if len(s["positions"]) < slots][: scenes - 1]
        chosen.append(next(s for s in pool if len(s["positions"]) == slots))
        return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in collate_scenes(chosen).items()}

    first, second = batch(30, 30), batch(20, 35)
    assert first["x"].shape[:2] == (30, 30) and second["x"].shape[:2] == (20, 35)
    model = make_module("baseline").model.eval()
    plain = torch.compile(model.forward, dynamic=True, fullgraph=True, backend="eager")
    ours = compile_forward(model.forward, fullgraph=True, backend="eager")
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        torch.compiler.reset()
        plain(first)
        with pytest.raises(torch._dynamo.exc.RecompileError):  # what compile_forward avoids
            plain(second)
        torch.compiler.reset()
        for b in (first, second):
            assert torch.isfinite(ours(b)["y_hat"]).all()


def test_a_failure_of_torch_compile_is_one_line_that_says_how_to_run_uncompiled():
    """torch.compile failing (a backend that cannot compile, or code inductor generated raising
    at a new batch size, as its CPU templates did in max-autotune modes) is a CompileError of one
    line naming the mode and compile=false, not inductor's traceback."""
    from forecast_peft.errors import CompileError

    def refuse(graph, example_inputs, **options):
        raise RuntimeError("no kernel for this graph\nmore detail")

    torch.compiler.reset()
    forward = compile_forward(lambda x: torch.sin(x) + 1, "max-autotune-no-cudagraphs", backend=refuse)
    with pytest.raises(CompileError) as caught:
        forward(torch.ones(3))
    line = str(caught.value)
    assert "\n" not in line and "no kernel for this graph" in line and "more detail" not in line
    assert line.startswith("the network compiled with compile_mode=max-autotune-no-cudagraphs failed in torch.compile")
    assert line.endswith("compile=false runs it uncompiled, or compile=true alone in the default mode")
    assert isinstance(caught.value.__cause__, Exception)  # the traceback stays reachable
    from forecast_peft.errors import UserError

    assert issubclass(CompileError, UserError)  # which the CLI prints as one line


def test_errors_from_generated_code_are_the_compilers_and_others_are_not():
    """An error raised in a file inductor generated (its cache folder is named torchinductor_*)
    counts as torch.compile's; the network's own errors, the device's memory and fpeft's own
    errors pass through as they are."""
    from forecast_peft.errors import Terminated, UserError
    from forecast_peft.models.compile import failed_in_compiler

    def raised_in(filename: str, err: Exception) -> Exception:
        code = compile("def call(err):\n    raise err\n", filename, "exec")
        scope = {}
        exec(code, scope)
        try:
            scope["call"](err)
        except Exception as raised:
            return raised
        raise AssertionError("nothing raised")

    generated = "/tmp/torchinductor_user/ab/cabc.py"
    assert failed_in_compiler(raised_in(generated, RuntimeError("Expected size for first two dimensions")))
    assert not failed_in_compiler(raised_in("/work/forecast_peft/models/layers.py", RuntimeError("shape")))
    for own in (torch.OutOfMemoryError("CUDA out of memory"), UserError("x"), Terminated()):
        assert not failed_in_compiler(raised_in(generated, own))

    torch.compiler.reset()
    forward = compile_forward(lambda x: x.view(-1, 7), backend="eager")
    with pytest.raises(Exception) as caught:  # the network's own error, met while tracing
        forward(torch.ones(3, 5))
    assert not isinstance(caught.value, UserError)


@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")  # the caches are off on purpose
def test_inductor_compiles_forward_and_backward_without_its_coalescing_analysis(monkeypatch):
    """``compile_forward`` hands inductor the mode's settings with its memory-coalescing tiling
    analysis off (it asserted on a PEFT training step with dynamic shapes on an H200, session 26):
    in force while inductor generates the forward's code and the backward's, and only there."""
    import torch._inductor.config as inductor_config
    from torch._inductor.codegen import cpp

    from forecast_peft.models.compile import inductor_options

    assert inductor_options("max-autotune-no-cudagraphs")["max_autotune"] is True  # the mode's own kept
    seen = []
    generate = cpp.CppScheduling.codegen_node

    def spy(self, node, *args, **kwargs):
        seen.append(inductor_config.triton.coalesce_tiling_analysis)
        return generate(self, node, *args, **kwargs)

    monkeypatch.setattr(cpp.CppScheduling, "codegen_node", spy)
    # generate the code rather than load it; torch's default for the analysis
    with inductor_config.patch({"force_disable_caches": True, "triton.coalesce_tiling_analysis": True}):
        torch.compiler.reset()
        forward = compile_forward(lambda x: (torch.sin(x) * x).sum(-1))
        x = torch.randn(5, 7, requires_grad=True)
        forward(x).sum().backward()
        torch.testing.assert_close(x.grad, torch.sin(x) + x * torch.cos(x))
        assert len(seen) >= 2 and not any(seen)  # forward and backward kernels, the analysis off
        assert inductor_config.triton.coalesce_tiling_analysis is True
    torch.compiler.reset()
