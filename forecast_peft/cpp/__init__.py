"""The C++ runner of `fpeft deploy aoti=true` packages (``forecast.cpp``: a package, inputs saved by
Python's torch.save in, forecasts out), compiled against the torch Python package's own libtorch
(its headers and libraries), with no CMake: ``python -m forecast_peft.cpp OUT``."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from forecast_peft.errors import UserError

SOURCE = Path(__file__).with_name("forecast.cpp")


def compile_command(out: Path, compiler: str) -> list[str]:
    """The command that compiles ``SOURCE`` into the program ``out`` against this torch's libtorch
    (its C++ ABI; the library folder on the program's run path, so it runs without LD_LIBRARY_PATH)."""
    import torch
    from torch.utils.cpp_extension import include_paths, library_paths

    lib = library_paths()[0]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    # a CUDA build's packages need its CUDA libraries loaded too, though nothing here names them
    cuda = ["-Wl,--no-as-needed", "-ltorch_cuda", "-lc10_cuda", "-Wl,--as-needed"]
    return [
        compiler,
        "-O2",
        "-std=c++20",  # torch's headers use C++20 features
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *(f"-I{path}" for path in include_paths()),
        str(SOURCE),
        "-o",
        str(out),
        f"-L{lib}",
        f"-Wl,-rpath,{lib}",
        *(cuda if Path(lib, "libtorch_cuda.so").exists() else []),
        "-ltorch",
        "-ltorch_cpu",
        "-lc10",
    ]


def build(out: str | Path) -> Path:
    """``SOURCE`` compiled into ``out`` (a minute at most); a missing compiler or a compiler error
    fails in one line. The compiler: $CXX, else g++."""
    out = Path(out)
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise UserError(f"no C++ compiler '{compiler}' on PATH: install g++ (or clang++ and set CXX=clang++)")
    out.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(compile_command(out, compiler), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines() or ["?"]
        raise UserError(f"{compiler} could not compile {SOURCE.name}: {errors[0].strip()}")
    return out
