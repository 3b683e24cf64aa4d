"""``deepspeed.utils.groups``: the process groups of a run.

Without sequence parallelism every rank is in one data-parallel group, the world; model,
tensor and sequence parallel groups are then of size one and the sequence-parallel group is
None. With ``sequence_parallel_size: sp`` (or ``mesh_param``/``data_parallel_size``, or an mpu
with sequence-parallel groups) ``initialize()`` records the groups its engine was built with
in :data:`_REGISTRY`, and the getters report them, as DeepSpeed's report its mesh device / mpu:

- ``_get_sequence_parallel_*``: the rank's sequence-parallel group (size sp);
- ``_get_sequence_data_parallel_*``: every rank holding a parameter replica (sp x dp), the
  group ZeRO spans (DeepSpeed: ``mpu.get_sequence_data_parallel_*``);
- ``_get_data_parallel_*``: the ranks at this rank's position in the other sequence-parallel
  groups (size dp), as DeepSpeed's ``data_parallel`` mesh dimension.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


class _ParallelGroupsRegistry:
    """The groups of the engine ``initialize()`` built last; mirrors DeepSpeed's module globals
    ``groups.mpu`` / ``groups.mesh_device`` (set by its engine) in one explicit object.
    ``sequence_parallel``: a ``ds_seq.SequenceParallelGroups`` (DeepSpeed's parallel_state_sp
    names) or None. ``initialize()`` sets it, ``engine.destroy()`` clears it."""

    __slots__ = ("sequence_parallel",)

    def __init__(self) -> None:
        self.sequence_parallel: Any = None

    def set(self, sequence_parallel: Any) -> None:
        self.sequence_parallel = sequence_parallel

    def clear(self, sequence_parallel: Any = None) -> None:
        """Forget the record (only if it is ``sequence_parallel`` when that is given)."""
        if sequence_parallel is None or self.sequence_parallel is sequence_parallel:
            self.sequence_parallel = None


_REGISTRY = _ParallelGroupsRegistry()


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _seq() -> Any:
    seq = _REGISTRY.sequence_parallel
    return seq if seq is not None and _initialized() else None


def _get_data_parallel_group() -> Any:
    seq = _seq()
    if seq is not None:
        return seq.get_data_parallel_group()
    return dist.group.WORLD if _initialized() else None


def _get_data_parallel_world_size() -> int:
    seq = _seq()
    if seq is not None:
        return seq.get_data_parallel_world_size()
    return dist.get_world_size() if _initialized() else 1


def _get_data_parallel_rank() -> int:
    seq = _seq()
    if seq is not None:
        return seq.get_data_parallel_rank()
    return dist.get_rank() if _initialized() else 0


def _get_model_parallel_world_size() -> int:
    return 1


def _get_sequence_parallel_group() -> Any:
    seq = _seq()
    return seq.get_sequence_parallel_group() if seq is not None else None


def _get_sequence_parallel_world_size() -> int:
    seq = _seq()
    return seq.get_sequence_parallel_world_size() if seq is not None else 1


def _get_sequence_parallel_rank() -> int:
    seq = _seq()
    return seq.get_sequence_parallel_rank() if seq is not None else 0


def _get_sequence_data_parallel_group() -> Any:
    seq = _seq()
    return seq.get_sequence_data_parallel_group() if seq is not None else _get_data_parallel_group()


def _get_sequence_data_parallel_world_size() -> int:
    seq = _seq()
    if seq is not None:
        return seq.get_sequence_data_parallel_world_size()
    return _get_data_parallel_world_size()


def _get_sequence_data_parallel_rank() -> int:
    seq = _seq()
    return seq.get_sequence_data_parallel_rank() if seq is not None else _get_data_parallel_rank()


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
