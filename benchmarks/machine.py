"""What a benchmark row ran on. CPU figures differ several-fold between machines of the same
core count: ``make bench``'s bf16 pre-training at commit 8c32d34 gave 12.0 scenes/s on the machine
that wrote its results and 0.5 when run again on an AMD EPYC where torch uses AVX2 (fp32: 11.3 and
7.3), same code, same torch. So a row names the processor and the instruction set torch uses."""

from __future__ import annotations


def cpu_name() -> str:
    """The processor's model name and torch's CPU capability, e.g. ``AMD EPYC (AVX2)``."""
    from forecast_peft.provenance import processor  # here: the scripts import torch after their own set-up

    return processor()


def device_name(device) -> str:
    """The GPU's name on CUDA, ``"cpu"`` elsewhere (the issue's ``gpu`` field)."""
    import torch

    return torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "cpu"
