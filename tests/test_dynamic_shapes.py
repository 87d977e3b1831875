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

from tests.test_host_sync import host_batch, make_module

SLOW = pytest.mark.slow
CASES = [("peft", False, "eager"), ("baseline", False, "eager"), ("peft", True, "eager"), ("ft", True, "eager")]
CASES += [("pretrain", True, "eager"), ("tpp", True, "eager")]
CASES += [pytest.param(task, True, "aot_eager", marks=SLOW) for task in ("peft", "pretrain")]


@pytest.mark.parametrize("task,train,backend", CASES)
def test_one_compilation_serves_every_batch_shape(task, train, backend):
    torch.compiler.reset()
    model = make_module(task).model.train(train)
    forward = torch.compile(model.forward, dynamic=True, fullgraph=True, backend=backend)
    batches = [host_batch(task, size, seed) for size, seed in ((6, 0), (9, 1), (4, 2))]
    for key in ("x", "lane_positions"):  # scenes, actor slots and lane slots all change
        assert len({b[key].shape[0] for b in batches}) == len({b[key].shape[1] for b in batches}) == 3
    with torch._dynamo.config.patch(error_on_recompile=True), torch.set_grad_enabled(train):
        for batch in batches:
            out = forward(batch)
            assert torch.isfinite(out["loss" if task in ("pretrain", "tpp") else "y_hat"]).all()
