"""Build the wheel of every package of this repository (or the named ones and the siblings they
need) into one folder, for ``pip install --find-links dist ds-zero``:

    python tools/build_wheels.py                    # every package -> dist/
    python tools/build_wheels.py ds-zero --dist /tmp/wheels

A wheel newer than every file of its package is kept; ``tools/install.py`` builds and installs in
one step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _packages as pk  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("packages", nargs="*", help="package names (default: all)")
    ap.add_argument("--dist", type=Path, default=pk.ROOT / "dist")
    ap.add_argument("--test", action="store_true", help="also the siblings of their test extras")
    ap.add_argument("--no-build-isolation", action="store_true",
                    help="build with the hatchling of this Python")  # fmt: skip
    a = ap.parse_args(argv)
    pkgs = pk.discover()
    group: dict[str, pk.Package] = {}
    for root in [pk.find(n, pkgs) for n in a.packages] or list(pkgs.values()):
        for p in pk.closure(root, pkgs, with_test=a.test):
            group.setdefault(p.folder, p)
    for w in pk.build_wheels(list(group.values()), a.dist, isolation=not a.no_build_isolation):
        print(w)
    return 0


if __name__ == "__main__":
    sys.exit(main())
