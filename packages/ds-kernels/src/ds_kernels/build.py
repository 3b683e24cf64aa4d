"""``python -m ds_kernels.build [--dest DIR] [--op NAME ...]``: ahead-of-time op builds.

Exit status 1 when an op failed to build (the message names the op and the compiler error).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ds_kernels._aot import build_all


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ds_kernels.build", description=__doc__)
    parser.add_argument(
        "--dest", type=Path, default=None, help="output root (default: the package's _prebuilt/)"
    )
    parser.add_argument(
        "--op", action="append", default=None, help="build only this op (repeatable)"
    )
    args = parser.parse_args(argv)
    failed = 0
    for res in build_all(args.dest, args.op):
        if res.error is None:
            print(f"built {res.op}: {res.library}")
        else:
            failed += 1
            print(f"FAILED {res.op}: {res.error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
