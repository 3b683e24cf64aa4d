"""The ``launcher`` section of ``ds-report`` (entry-point group ``ds_report.sections``): the
programs each ``--launcher`` needs and where they are on PATH, and the default hostfile."""

from __future__ import annotations

import os
import shutil
from typing import Any

from ds_launcher._cli import DEFAULT_HOSTFILE

# --launcher value -> the programs it runs (ssh/pdsh start ds-launch's agent on every node)
_NEEDS = {
    "ssh": ("ssh",),
    "pdsh": ("pdsh", "ssh"),
    "openmpi": ("mpirun",),
    "mpich": ("mpiexec",),
    "slurm": ("srun",),
}


def launcher_report() -> dict[str, Any]:
    runners = {name: {prog: shutil.which(prog) for prog in progs} for name, progs in _NEEDS.items()}
    return {
        "runners": {
            name: {"ready": all(progs.values()), "programs": progs}
            for name, progs in runners.items()
        },
        "default hostfile": DEFAULT_HOSTFILE if os.path.isfile(DEFAULT_HOSTFILE) else None,
    }
