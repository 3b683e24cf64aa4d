"""The ``comm`` section of ``ds-report`` (entry-point group ``ds_report.sections``): which
torch.distributed backends this torch has, whether mpi4py is usable, and which launcher's
variables this process sees, so a user can tell what ``init_distributed()`` would do."""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist

from ds_comm._discovery import launched_by_mpi

# The variables each discovery path reads first (see _discovery): present means "would be used".
_LAUNCH_VARS = {
    "torchrun / ds-launch": ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"),
    "slurm": ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_NODELIST"),
}


def _mpi4py() -> dict[str, Any]:
    try:
        import mpi4py
    except ImportError:
        return {"installed": False, "fix": "pip install 'ds-comm[mpi]' for MPI discovery"}
    return {"installed": True, "version": mpi4py.__version__}


def comm_report() -> dict[str, Any]:
    if not dist.is_available():
        return {"torch.distributed": False, "fix": "this torch build has no distributed support"}
    backends = {
        "gloo": dist.is_gloo_available(),
        "nccl": dist.is_nccl_available(),
        "mpi": dist.is_mpi_available(),
        "ucc": bool(getattr(dist, "is_ucc_available", lambda: False)()),
    }
    env = {name: all(v in os.environ for v in keys) for name, keys in _LAUNCH_VARS.items()}
    env["mpi"] = launched_by_mpi(os.environ)
    return {
        "torch.distributed": True,
        "backends": backends,
        "mpi4py": _mpi4py(),
        "launch environment": env,
        "initialized": dist.is_initialized(),
    }
