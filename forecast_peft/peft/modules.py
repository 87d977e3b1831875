"""The parameters PEFT adds: prompt tokens and parallel adapters."""

from __future__ import annotations

import torch
from torch import nn

from forecast_peft.models.layers import Block


class PromptTokens(nn.Module):
    """Learned prompt tokens [groups, num, dim]: one group per encoder layer (Contextual
    Embedding Prompts) or per mode (Modality Control Prompts)."""

    def __init__(self, groups: int, num: int, dim: int):
        super().__init__()
        self.tokens = nn.Parameter(torch.zeros(groups, num, dim))
        nn.init.trunc_normal_(self.tokens, std=0.02)


class Adapter(nn.Module):
    """Bottleneck adapter (down, GELU, up) set in parallel to a block's attention or MLP. The up
    projection starts at zero, so an injected adapter leaves the network's output unchanged."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.act = nn.GELU()
        self.up = nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


def inject_adapters(model: nn.Module, rank: int) -> int:
    """Attach attention and MLP adapters to every transformer ``Block`` of ``model``; returns
    how many blocks got them."""
    count = 0
    for module in model.modules():
        if isinstance(module, Block) and module.adapter_attn is None:
            dim = module.norm1.normalized_shape[0]
            module.adapter_attn = Adapter(dim, rank)
            module.adapter_mlp = Adapter(dim, rank)
            count += 1
    return count
