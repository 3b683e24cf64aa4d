"""Where the offload benchmarks find the peers' scripts and the packages' sources (run from a
checkout; the GPU machine has no installed packages, only PYTHONPATH)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _pythonpath import pythonpath as _checkout_pythonpath  # noqa: E402

PEERS_CANDIDATES = [ROOT / "shared" / "peers", Path("/work/shared/peers")]


def peers_dir(arg: str | None) -> Path:
    for p in [Path(arg)] if arg else PEERS_CANDIDATES:
        if (p / "tinygpt.py").is_file():
            return p
    raise SystemExit(f"tinygpt.py not found in {PEERS_CANDIDATES}; pass --peers-dir")


def pythonpath() -> str:
    """Every package's src/ folder but ds-deepspeed's, then the caller's PYTHONPATH: the peer
    runs import the real DeepSpeed, and ours import ds_all, not its `deepspeed` alias."""
    return _checkout_pythonpath(alias=False)
