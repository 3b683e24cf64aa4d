"""Where the offload benchmarks find the peers' scripts and the packages' sources (run from a
checkout; the GPU machine has no installed packages, only PYTHONPATH)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PEERS_CANDIDATES = [ROOT / "shared" / "peers", Path("/work/shared/peers")]


def peers_dir(arg: str | None) -> Path:
    for p in [Path(arg)] if arg else PEERS_CANDIDATES:
        if (p / "tinygpt.py").is_file():
            return p
    raise SystemExit(f"tinygpt.py not found in {PEERS_CANDIDATES}; pass --peers-dir")


def pythonpath() -> str:
    """Every package's src/ folder, then the caller's PYTHONPATH."""
    paths = [str(p) for p in sorted((ROOT / "packages").glob("*/src"))]
    return os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")])
