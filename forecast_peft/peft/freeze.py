"""Which parameters train, decided by module structure (never by parameter-name substrings)."""

from __future__ import annotations

from torch import nn

from forecast_peft.peft.modules import Adapter, PromptTokens

NORMS = (nn.LayerNorm, nn.BatchNorm1d)
WITH_BIAS = (nn.Linear, nn.Conv1d, nn.LayerNorm, nn.BatchNorm1d)


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def peft_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Prompt tokens and adapter weights: the parameters PEFT adds to the backbone."""
    params = []
    for module in model.modules():
        if isinstance(module, (PromptTokens, Adapter)):
            params.extend(module.parameters())
    return params


def configure_peft(model: nn.Module) -> None:
    """Forecast-PEFT: the backbone is frozen; trainable are the prompts and adapters, every bias
    vector (of linear, convolution and norm layers), the LayerNorm scales, and the task modules
    the model names in ``heads()`` (decoder input projection, trajectory and score heads).
    BatchNorm scales stay frozen, and so do their running statistics (see ``_PointBatchNorm``)."""
    freeze_all(model)
    for p in peft_parameters(model):
        p.requires_grad_(True)
    for module in model.modules():
        if isinstance(module, WITH_BIAS) and getattr(module, "bias", None) is not None:
            module.bias.requires_grad_(True)
        if isinstance(module, nn.LayerNorm) and module.weight is not None:
            module.weight.requires_grad_(True)
    for head in model.heads():
        for p in head.parameters():
            p.requires_grad_(True)


def configure_tpp(model: nn.Module) -> None:
    """Target-parameter pre-training: only the prompts and adapters learn."""
    freeze_all(model)
    for p in peft_parameters(model):
        p.requires_grad_(True)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def trainable_line(model: nn.Module) -> str:
    n, m = count_parameters(model)
    return f"trainable parameters: {n:,} of {m:,} ({100.0 * n / max(m, 1):.1f}%)"
