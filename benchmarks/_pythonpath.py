"""PYTHONPATH for a benchmark's child processes: the packages of this checkout run from their
src/ folders (the GPU machine has no installed packages).

ds-deepspeed's src/ holds a package named `deepspeed` that aliases ds_all. A child that must
import the real DeepSpeed (a peer run) or that does not need the alias gets ``alias=False``: that
src/ is then left out, also where the caller's PYTHONPATH carried it (benchmarks/gpu_session.sh
puts every package's src/ there).
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALIAS_SRC = ROOT / "packages" / "ds-deepspeed" / "src"


def pythonpath(*, alias: bool = True) -> str:
    """Every package's src/, then the caller's PYTHONPATH; without ds-deepspeed's src/ anywhere
    when ``alias`` is false."""
    ours = [p for p in sorted((ROOT / "packages").glob("*/src")) if alias or p != ALIAS_SRC]
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if not alias:
        inherited = [p for p in inherited if Path(p).resolve() != ALIAS_SRC]
    return os.pathsep.join(dict.fromkeys([str(p) for p in ours] + inherited))
