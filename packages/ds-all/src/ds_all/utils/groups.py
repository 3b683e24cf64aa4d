"""``deepspeed.utils.groups``: the process groups of a run.

Without model parallelism (no ``mpu``) every rank is in one data-parallel group, the world;
model, tensor and sequence parallel groups are then of size one and their group is None."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _get_data_parallel_group() -> Any:
    return dist.group.WORLD if _initialized() else None


def _get_data_parallel_world_size() -> int:
    return dist.get_world_size() if _initialized() else 1


def _get_data_parallel_rank() -> int:
    return dist.get_rank() if _initialized() else 0


def _get_model_parallel_world_size() -> int:
    return 1


def _get_sequence_parallel_group() -> Any:
    return None


def _get_sequence_parallel_world_size() -> int:
    return 1


def _get_sequence_parallel_rank() -> int:
    return 0


def _get_sequence_data_parallel_group() -> Any:
    return _get_data_parallel_group()


def _get_sequence_data_parallel_world_size() -> int:
    return _get_data_parallel_world_size()


def _get_sequence_data_parallel_rank() -> int:
    return _get_data_parallel_rank()


get_data_parallel_group = _get_data_parallel_group
get_data_parallel_world_size = _get_data_parallel_world_size
get_data_parallel_rank = _get_data_parallel_rank
get_model_parallel_world_size = _get_model_parallel_world_size
get_tensor_model_parallel_world_size = _get_model_parallel_world_size


def get_model_parallel_rank() -> int:
    return 0


get_tensor_model_parallel_rank = get_model_parallel_rank

__all__ = [
    "get_data_parallel_group",
    "get_data_parallel_rank",
    "get_data_parallel_world_size",
    "get_model_parallel_rank",
    "get_model_parallel_world_size",
    "get_tensor_model_parallel_rank",
    "get_tensor_model_parallel_world_size",
]
