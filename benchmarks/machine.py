"""What a benchmark row ran on. CPU figures differ several-fold between machines of the same
core count: ``make bench``'s bf16 pre-training at commit 8c32d34 gave 12.0 scenes/s on the machine
that wrote its results and 0.5 when run again on an AMD EPYC where torch uses AVX2 (fp32: 11.3 and
7.3), same code, same torch. So a row names the processor and the instruction set torch uses."""

from __future__ import annotations

from pathlib import Path


def cpu_name() -> str:
    """The processor's model name and torch's CPU capability, e.g. ``AMD EPYC (AVX2)``."""
    import torch  # here, not at the top: the scripts import torch after their own set-up

    model = "unknown processor"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({torch.backends.cpu.get_cpu_capability()})"


def device_name(device) -> str:
    """The GPU's name on CUDA, ``"cpu"`` elsewhere (the issue's ``gpu`` field)."""
    import torch

    return torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "cpu"
