"""``deepspeed.comm``: ds_comm's collectives under DeepSpeed's module name, with DeepSpeed's
``init_distributed`` signature and its rank helpers."""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as _dist

from ds_all._initialize import init_distributed  # noqa: F401  (DeepSpeed's signature)
from ds_comm import *  # noqa: F403
from ds_comm import __all__ as _comm_all


def is_available() -> bool:
    return _dist.is_available()


def get_local_rank() -> int:
    """This process's rank on its node (LOCAL_RANK, set by every launcher; 0 when alone)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def get_global_rank(group: Any = None, group_rank: int = 0) -> int:
    """The global rank of ``group_rank`` within ``group`` (the world when None)."""
    if group is None:
        return group_rank
    return _dist.get_global_rank(group, group_rank)


def get_world_group() -> Any:
    return _dist.group.WORLD


def broadcast_object_list(
    object_list: list[Any], src: int, group: Any = None, device: Any = None
) -> None:
    _dist.broadcast_object_list(object_list, src, group=group, device=device)


def all_gather_object(object_list: list[Any], obj: Any, group: Any = None) -> None:
    _dist.all_gather_object(object_list, obj, group=group)


def monitored_barrier(group: Any = None, timeout: Any = None, wait_all_ranks: bool = False) -> None:
    _dist.monitored_barrier(group=group, timeout=timeout, wait_all_ranks=wait_all_ranks)


__all__ = sorted(
    {
        *_comm_all,
        "all_gather_object",
        "broadcast_object_list",
        "get_global_rank",
        "get_local_rank",
        "get_world_group",
        "init_distributed",
        "is_available",
        "monitored_barrier",
    }
)
