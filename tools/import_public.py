"""Import a package and every name in its ``__all__`` (the isolation session runs this in an
environment holding only the package and its declared dependencies)."""

from __future__ import annotations

import importlib
import sys


def main(module: str) -> int:
    m = importlib.import_module(module)
    names = getattr(m, "__all__", None)
    if not names:
        print(f"{module}: no __all__; the public API must be listed there")
        return 1
    missing = [n for n in names if not hasattr(m, n)]
    if missing:
        print(f"{module}.__all__ lists names the module does not have: {missing}")
        return 1
    print(f"{module}: {len(names)} public names import")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
