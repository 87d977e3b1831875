"""``python -m forecast_peft.cpp OUT``: the C++ runner of `fpeft deploy aoti=true` packages, built."""

from __future__ import annotations

import argparse
import sys

from forecast_peft.cpp import SOURCE, build
from forecast_peft.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m forecast_peft.cpp",
        description=f"Compile {SOURCE} (it runs a `fpeft deploy aoti=true` package from C++ with libtorch alone) "
        "against this torch's libtorch.",
    )
    parser.add_argument("out", help="the program to write, e.g. build/forecast")
    args = parser.parse_args(argv)
    try:
        program = build(args.out)
    except UserError as err:
        print(f"forecast_peft.cpp: error: {err}", file=sys.stderr)
        return 1
    print(f"{program}: run it as `{program} MODEL.aoti.pt2 INPUTS.pt OUT.pt` (see {SOURCE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
