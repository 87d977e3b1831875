"""Adapters folded into the layers beside them (``peft.fold``) give the forecasts of the model
they were folded from."""

import pytest
import torch

from forecast_peft.data.dataset import ForecastDataset, collate_scenes
from forecast_peft.models.forecaster import build_forecaster
from forecast_peft.models.layers import Block
from forecast_peft.peft.fold import fold_adapters
from forecast_peft.peft.modules import Adapter
from tests.test_models import _double_batch, _double_block_stack, tiny


def _model(mode: str = "peft") -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_forecaster(tiny(), mode).double().eval()
    for p in model.parameters():  # adapters (their zero up-projections) and prompts made non-zero
        torch.nn.init.normal_(p, std=0.2)
    return model


@pytest.fixture(scope="module")
def scenes(synth_root):
    data = ForecastDataset(synth_root / "cache", "val")
    return [data[i] for i in range(6)]


@pytest.mark.parametrize("static", [False, True], ids=["packed", "padded"])
def test_folded_peft_model_gives_the_same_forecasts(scenes, static):
    """Every block's adapters folded: the same trajectories and scores at 1e-10 in float64, on
    batches whose blocks skip padding and on the padded layout of CUDA-graph batches."""
    model = _model()
    folded = fold_adapters(model)
    blocks = [m for m in folded.modules() if isinstance(m, Block)]
    assert blocks and all(b.adapter_attn is None and b.adapter_mlp is None for b in blocks)
    assert all(b.attn.folded == tiny().peft.adapter_rank for b in blocks)
    assert not any(isinstance(m, Adapter) for m in folded.modules())
    # the context prompts' keys and values, computed once: [depth, P, 2D]
    assert folded.encoder.context_prompts is None and folded.encoder.context_kv.shape == (2, 4, 64)
    # and the mode prompts' input projection in the decoder's first block: [K, P, 3D + rank]
    assert folded.mode_qkv.shape == (6, 4, 3 * 32 + 8) and model.mode_qkv is None
    batch = _double_batch(collate_scenes(scenes, static=static))
    with torch.no_grad():
        ref, out = model(batch), folded(batch)
    for key in ("y_hat", "pi"):
        torch.testing.assert_close(out[key], ref[key], rtol=1e-10, atol=1e-10)
    assert ref["y_hat"].std() > 0.1  # not a comparison of zeros (0.47 with torch 2.13, 0.30 with 2.11)


def test_folding_leaves_the_model_itself_alone():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fold_adapters(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(isinstance(b.adapter_attn, Adapter) for b in model.modules() if isinstance(b, Block))


@pytest.mark.parametrize("queries", [None, (0, 5)])
def test_folded_block_equals_the_block_with_adapters(queries):
    """One block, with prompts as memory and with the output limited to some tokens."""
    (block,) = _double_block_stack(1)
    folded = fold_adapters(block)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    memory = torch.randn(3, 16, dtype=torch.float64)
    attend = torch.ones(2, 9, dtype=torch.bool)
    attend[1, 6:] = False
    torch.testing.assert_close(
        folded(x, attend, queries, memory), block(x, attend, queries, memory), rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize("mode", ["ft", "baseline"])
def test_a_model_without_adapters_gives_the_same_forecasts(scenes, mode):
    """FT: no adapters to fold, the context prompts' keys and values computed once; the
    fine-tuning baseline: nothing to fold."""
    model = _model(mode)
    folded = fold_adapters(model)
    assert all(b.attn.folded == 0 for b in folded.modules() if isinstance(b, Block))
    assert (folded.encoder.context_kv is None) == (mode == "baseline")
    assert mode == "baseline" or folded.mode_qkv.shape == (6, 4, 3 * 32)
    batch = _double_batch(collate_scenes(scenes))
    with torch.no_grad():
        ref, out = model(batch), folded(batch)
    torch.testing.assert_close(out["y_hat"], ref["y_hat"], rtol=1e-10, atol=1e-10)


def test_an_adapter_with_another_activation_is_refused():
    (block,) = _double_block_stack(1)
    block.adapter_mlp.act = torch.nn.ReLU()
    with pytest.raises(ValueError, match="activation"):
        fold_adapters(block)
