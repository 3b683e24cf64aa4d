"""How many threads the CPU optimizer of one process gets.

The offloaded step is bound by the host's memory bandwidth, which takes most of the cores to
saturate, so the default is this process's share of its cores: all of them for one process,
an equal part for each of several ranks on a node. ``OMP_NUM_THREADS=1``, which torchrun sets
for every process when it starts several and the variable is unset, is not taken as a request:
on one thread an offloaded step of a 1B-parameter model takes seconds (ask for one thread with
``offload_optimizer.num_threads: 1``).
"""

from __future__ import annotations

import os

from ds_accel import usable_cores


def _env_int(name: str) -> int:
    """A positive integer environment variable, or 0 (unset, empty or not a number)."""
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() else 0


# Ranks on this node, by launcher: torchrun / ds-launch, OpenMPI, MPICH (hydra), SLURM (srun).
_LOCAL_SIZE_VARS = (
    "LOCAL_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "MPI_LOCALNRANKS",
    "SLURM_NTASKS_PER_NODE",
)


def local_ranks() -> int:
    """Processes of this job on this node (1 where no launcher says)."""
    for name in _LOCAL_SIZE_VARS:
        n = _env_int(name)  # SLURM's "2(x3)" form is not a number and is skipped
        if n:
            return n
    return 1


def cpu_optimizer_threads(requested: int = 0) -> int:
    """Threads for the CPU optimizer: ``requested`` when > 0; else ``OMP_NUM_THREADS`` when it
    is above 1 (a launcher that binds cores to ranks, e.g. ``ds-launch --bind_cores_to_rank``,
    sets it to each rank's share), capped at the usable cores; else the usable cores divided
    by the ranks on this node, which share those cores (``LOCAL_WORLD_SIZE``, or OpenMPI's,
    MPICH's or SLURM's variable for it)."""
    if requested < 0:
        raise ValueError(
            f"zero_optimization.offload_optimizer.num_threads must be >= 0 (0: automatic), got "
            f"{requested}"
        )
    if requested:
        return requested
    cores = usable_cores()
    omp = _env_int("OMP_NUM_THREADS")
    if omp > 1:
        return min(omp, cores)
    return max(1, cores // local_ranks())
