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


def follow_settings(
    optimizer: torch.optim.Optimizer, scheduler, optim: dict, steps_per_epoch: tuple[float | None, float]
) -> list[str]:
    """Set an optimiser and schedule restored from a checkpoint (a resumed run's) to this fit's
    settings, which ``--resume`` may have changed: ``optim``'s learning rate and weight decay (the
    restored state holds those the run started with), and ``steps_per_epoch`` (the checkpoint's
    fit's, None where unknown, and this fit's: another ``data.batch_size`` or
    ``data.train_fraction``), to which the schedule's step is rescaled, so that it goes on from
    the same epoch. Returns what changed, one phrase each (``optim.lr: a -> b``)."""
    changed = []
    before, now = steps_per_epoch
    if before and before != now:
        changed.append(f"{now:g} optimiser steps per epoch (were {before:g}; the schedule goes on from the same epoch)")
        scheduler.last_epoch = round(scheduler.last_epoch * now / before)
    if any(base != optim["lr"] for base in scheduler.base_lrs):
        changed.append(f"optim.lr: {scheduler.base_lrs[0]:g} -> {optim['lr']:g}")
        scheduler.base_lrs = [optim["lr"]] * len(optimizer.param_groups)
    if changed:  # each group's rate at the schedule's step, as LambdaLR sets it
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() says
    decay = optimizer.param_groups[0]  # param_groups' order: the decay group first
    if decay["weight_decay"] != optim["weight_decay"]:
        changed.append(f"optim.weight_decay: {decay['weight_decay']:g} -> {optim['weight_decay']:g}")
        decay["weight_decay"] = optim["weight_decay"]
    return changed
