"""Adapters folded into the layers beside them, for inference.

A parallel adapter reads the same normalised tokens as the branch it sits beside, so for
inference it can join that branch's matrix products:

- beside the MLP (Linear, GELU, Linear), the adapter (down, GELU, up) is the same form: one MLP
  with ``hidden + rank`` hidden units computes both, fc1's rows then down's in, fc2's columns
  then up's out, the two output biases added;
- beside the attention, down's rows join the in-projection (after the query rows) and up's
  columns join the output projection, which then reads the attention's result and the GELU of
  the adapter's hidden units (``SelfAttention.folded``).

Each transformer block then runs four matrix products instead of eight, with the same outputs
(tests: float64, 1e-10): fewer and larger kernels, which is what a GPU step bound by kernel
launches wants. The encoder's context prompts and the decoder's mode prompts depend on the weights
alone, so the prompts' keys and values (``SceneEncoder.context_kv``) and the mode prompts' input
projection in the decoder's first block (``PromptForecaster.mode_qkv``) are computed here once
instead of in every pass.

The folded copy is for inference only: its parameters no longer match a checkpoint's, and
training it would train the frozen backbone's rows too.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from forecast_peft.models.encoder import SceneEncoder
from forecast_peft.models.forecaster import PromptForecaster
from forecast_peft.models.layers import Block, Mlp, SelfAttention
from forecast_peft.peft.modules import Adapter


def fold_adapters(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (in eval mode, no gradients) with the adapters of every transformer
    ``Block`` folded into its attention and MLP and the projections of its prompts computed;
    ``model`` itself is left as it is. A model with neither adapters nor prompts (the
    fine-tuning baseline) comes back as a plain copy."""
    folded = copy.deepcopy(model).eval().requires_grad_(False)
    with torch.no_grad():
        for block in folded.modules():
            if isinstance(block, Block):
                _fold_block(block)
        # then what depends on the (folded) weights alone, once
        for module in folded.modules():
            if isinstance(module, SceneEncoder) and module.context_prompts is not None:
                prompts = module.context_prompts.tokens  # [depth, P, D]
                module.context_kv = torch.stack([b.memory_keys_values(p) for b, p in zip(module.blocks, prompts)])
                module.context_prompts = None
            if isinstance(module, PromptForecaster):
                module.mode_qkv = module.decoder.blocks[0].prefix_projection(module.mode_prompts.tokens)
    return folded


def _fold_block(block: Block) -> None:
    if block.adapter_mlp is not None:
        block.mlp = _widened_mlp(block.mlp, block.adapter_mlp)
        block.adapter_mlp = None
    if block.adapter_attn is not None:
        _fold_into_attention(block.attn, block.adapter_attn)
        block.adapter_attn = None


def _check_gelu(adapter: Adapter) -> None:
    # the folded form applies the branch's GELU (exact, the default) to the adapter's units too
    if not isinstance(adapter.act, nn.GELU) or adapter.act.approximate != "none":
        raise ValueError(f"cannot fold an adapter whose activation is {adapter.act}, not the exact GELU")


def _widened_mlp(mlp: Mlp, adapter: Adapter) -> Mlp:
    """The MLP and its parallel adapter as one MLP with ``hidden + rank`` hidden units."""
    _check_gelu(adapter)
    fc1, act, fc2 = mlp
    if not isinstance(act, nn.GELU) or act.approximate != "none":
        raise ValueError(f"cannot fold an adapter beside an MLP whose activation is {act}")
    dim, hidden, rank = fc1.in_features, fc1.out_features, adapter.down.out_features
    wide = Mlp(dim, hidden + rank, fc2.out_features).to(device=fc1.weight.device, dtype=fc1.weight.dtype)
    wide[0].weight.copy_(torch.cat([fc1.weight, adapter.down.weight]))
    wide[0].bias.copy_(torch.cat([fc1.bias, adapter.down.bias]))
    wide[2].weight.copy_(torch.cat([fc2.weight, adapter.up.weight], dim=1))
    wide[2].bias.copy_(fc2.bias + adapter.up.bias)
    return wide.requires_grad_(False)


def _fold_into_attention(attn: SelfAttention, adapter: Adapter) -> None:
    """Down's rows into the in-projection after the query rows, up's columns after the output
    projection's (``SelfAttention.folded``)."""
    _check_gelu(adapter)
    if attn.folded:
        raise ValueError("this attention has an adapter folded in already")
    d, rank = attn.proj.out_features, adapter.down.out_features
    qkv, proj = attn.qkv, attn.proj
    new_qkv = nn.Linear(d, 3 * d + rank, bias=True).to(device=qkv.weight.device, dtype=qkv.weight.dtype)
    new_qkv.weight.copy_(torch.cat([qkv.weight[:d], adapter.down.weight, qkv.weight[d:]]))
    qkv_bias = qkv.bias if qkv.bias is not None else qkv.weight.new_zeros(3 * d)
    new_qkv.bias.copy_(torch.cat([qkv_bias[:d], adapter.down.bias, qkv_bias[d:]]))
    new_proj = nn.Linear(d + rank, d).to(device=proj.weight.device, dtype=proj.weight.dtype)
    new_proj.weight.copy_(torch.cat([proj.weight, adapter.up.weight], dim=1))
    new_proj.bias.copy_(proj.bias + adapter.up.bias)
    attn.qkv, attn.proj = new_qkv.requires_grad_(False), new_proj.requires_grad_(False)
    attn.folded = rank
