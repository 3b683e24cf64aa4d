"""``deepspeed.runtime.sequence_parallel.parallel_state_sp``: DeepSpeed's slim mpu of sequence
parallelism, as module functions (code passes this module as ``initialize(mpu=...)``).

The groups are ds-seq's (``build_sequence_parallel_groups``: consecutive ranks form a
sequence-parallel group, all ranks one sequence-data-parallel group); they are recorded in the
same registry ``deepspeed.utils.groups`` reads, so both report the same groups."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from ds_all.utils.groups import _REGISTRY
from ds_seq import build_sequence_parallel_groups

__all__ = [
    "get_sequence_data_parallel_group",
    "get_sequence_data_parallel_rank",
    "get_sequence_data_parallel_world_size",
    "get_sequence_parallel_group",
    "get_sequence_parallel_rank",
    "get_sequence_parallel_world_size",
    "initialize_sequence_parallel",
]


def initialize_sequence_parallel(sequence_parallel_size: int) -> None:
    """Build the groups (a collective: every rank calls it). As DeepSpeed: torch.distributed
    must be initialised, the size > 1 and dividing the world, and only once per process."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "initialize_sequence_parallel: torch.distributed is not initialised; call "
            "ds_comm.init_distributed() (or deepspeed.init_distributed()) first"
        )
    world = dist.get_world_size()
    if world < sequence_parallel_size:
        raise RuntimeError(
            f"world_size ({world}) is less than sequence_parallel_size {sequence_parallel_size}"
        )
    if sequence_parallel_size <= 1:
        raise ValueError(
            f"sequence_parallel_size must be greater than 1, got {sequence_parallel_size}"
        )
    if world % sequence_parallel_size != 0:
        raise RuntimeError(
            f"world_size ({world}) is not divisible by sequence_parallel_size {sequence_parallel_size}"
        )
    if _REGISTRY.sequence_parallel is not None:
        raise RuntimeError(
            "sequence parallel group is already initialized; build it once per process (call "
            "_release_sequence_parallel_groups() after destroying the process group to rebuild)"
        )
    _REGISTRY.set(build_sequence_parallel_groups(sequence_parallel_size))


def _release_sequence_parallel_groups() -> None:
    """Forget the groups (DeepSpeed calls it after tearing down the world group)."""
    _REGISTRY.clear()


def _groups() -> Any:
    seq = _REGISTRY.sequence_parallel
    if seq is None:
        raise RuntimeError(
            "sequence parallel group is not initialized: call initialize_sequence_parallel(sp) "
            "or deepspeed.initialize with sequence_parallel_size > 1 first"
        )
    return seq


def get_sequence_parallel_group() -> Any:
    """The sequence-parallel group of this rank."""
    return _groups().get_sequence_parallel_group()


def get_sequence_data_parallel_group() -> Any:
    """The sequence-data-parallel group of this rank (sp x dp ranks)."""
    return _groups().get_sequence_data_parallel_group()


def get_sequence_parallel_world_size() -> int:
    return int(_groups().get_sequence_parallel_world_size())


def get_sequence_data_parallel_world_size() -> int:
    return int(_groups().get_sequence_data_parallel_world_size())


def get_sequence_parallel_rank() -> int:
    return int(_groups().get_sequence_parallel_rank())


def get_sequence_data_parallel_rank() -> int:
    return int(_groups().get_sequence_data_parallel_rank())
