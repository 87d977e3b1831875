"""AdamW with decay groups and a linear warm-up then cosine schedule (stepped per batch)."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weights of linear and convolution layers decay; biases, norms, embeddings, tokens and
    prompts do not. Only parameters with ``requires_grad`` are handed to the optimiser."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if isinstance(module, (nn.Linear, nn.Conv1d)) and name == "weight":
                decay.append(p)
            else:
                no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier at ``step``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, optim: dict, total_steps: int, max_epochs: int):
    """Lightning ``configure_optimizers`` return value for ``model`` and an ``optim`` config."""
    opt = torch.optim.AdamW(param_groups(model, optim["weight_decay"]), lr=optim["lr"])
    steps_per_epoch = total_steps / max(1, max_epochs)
    warmup = max(1, round(min(optim["warmup_epochs"], max_epochs) * steps_per_epoch))
    min_ratio = optim["min_lr"] / optim["lr"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup, total_steps, min_ratio))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
