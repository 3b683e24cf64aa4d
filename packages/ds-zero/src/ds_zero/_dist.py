"""Thin helpers over torch.distributed that also work without a process group (world of 1)."""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed import ProcessGroup


def group_size(group: ProcessGroup | None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def group_rank(group: ProcessGroup | None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


def global_rank_of(group: ProcessGroup | None, rank_in_group: int) -> int:
    """Global rank of ``rank_in_group`` (torch's broadcast takes global ranks)."""
    if group is None or not (dist.is_available() and dist.is_initialized()):
        return rank_in_group
    return dist.get_global_rank(group, rank_in_group)
