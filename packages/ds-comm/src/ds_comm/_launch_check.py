"""Refuse to build a distributed object in a launched rank that has no process group.

A script started by torchrun, ds-launch, mpirun or srun as one of several ranks but never calling
``init_distributed()`` still runs: every ZeRO / pipeline / MoE object falls back to a world of one,
so each rank trains alone on its own data and the ranks silently diverge. The launchers all say
how many ranks they started, so that mistake is detected at construction and reported with the
fix instead.

Only the world size the launcher announced is read here (no rendezvous, no MPI call), so the
check is cheap and side-effect free; malformed values are left for ``discover()`` to report.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch.distributed as dist

from ds_comm._discovery import WORLD_SIZE_VARS


class NotInitializedError(RuntimeError):
    """A launched rank of a multi-process job created a distributed object without a process
    group (call ``ds_comm.init_distributed()`` first)."""


@dataclass(frozen=True)
class LaunchedRank:
    """What a launcher said about this process: its rank, the world size, and where from."""

    rank: int
    world_size: int
    variable: str  #: the environment variable holding the world size
    launcher: str  #: who sets that variable, for the error message


def _as_int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def launched_rank(env: Mapping[str, str] | None = None) -> LaunchedRank | None:
    """The multi-rank layout a launcher announced to this process, or None for a lone process
    (no launcher variable set, or a world size of 1)."""
    env = os.environ if env is None else env
    for size_var, rank_var, launcher in WORLD_SIZE_VARS:
        world = _as_int(env.get(size_var))
        if world is None:
            continue
        if world <= 1:
            return None  # a launcher that started one rank: a lone process is right
        rank = _as_int(env.get(rank_var))
        return LaunchedRank(rank if rank is not None else -1, world, size_var, launcher)
    return None


def require_initialized_if_launched(what: str, env: Mapping[str, str] | None = None) -> None:
    """Raise :class:`NotInitializedError` when this process is one of several launched ranks and
    torch.distributed has no default process group; do nothing otherwise.

    ``what`` names the object being built (``"ds_zero.wrap"``), so the message says which call
    needs the process group. Call it at the top of a constructor that falls back to a world of
    one without a process group.
    """
    if dist.is_available() and dist.is_initialized():
        return
    found = launched_rank(env)
    if found is None:
        return
    who = f"rank {found.rank}" if found.rank >= 0 else "a rank"
    raise NotInitializedError(
        f"{what}: this process is {who} of {found.world_size} ({found.variable}="
        f"{found.world_size} from {found.launcher}) but torch.distributed is not initialised, "
        f"so every rank would train alone on its own data; call ds_comm.init_distributed() "
        f"(or torch.distributed.init_process_group()) before {what}, or unset "
        f"{found.variable} to run this process alone"
    )
