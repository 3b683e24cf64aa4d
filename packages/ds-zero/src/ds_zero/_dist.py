"""Thin helpers over torch.distributed that also work without a process group (world of 1)."""

from __future__ import annotations

from typing import Any

import torch
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


def _logging() -> bool:
    # ds-comm's comms logger sees ZeRO's collectives (bytes per step) when it is enabled; when
    # it is off the calls go straight to torch.distributed, as before
    import ds_comm

    return ds_comm.get_comms_logger().enabled


def all_gather_single(
    output: torch.Tensor,
    input_: torch.Tensor,
    group: ProcessGroup | None = None,
    async_op: bool = False,
    *,
    log_name: str = "zero_all_gather",
) -> Any:
    """All-gather ``input_`` of every rank into ``output`` (one flat tensor).

    torch 2.12+ names this ``all_gather_single`` and warns (FutureWarning, on every call) for the
    old ``all_gather_into_tensor``; torch 2.6-2.11 have only the old name. Looked up per call so
    tests can wrap torch's function. Recorded under ``log_name`` by an enabled comms logger."""
    if _logging():
        import ds_comm

        return ds_comm.all_gather_into_tensor(output, input_, group, async_op, log_name=log_name)
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(output, input_, group=group, async_op=async_op)


def reduce_scatter_single(
    output: torch.Tensor,
    input_: torch.Tensor,
    group: ProcessGroup | None = None,
    async_op: bool = False,
    *,
    log_name: str = "zero_reduce_scatter",
) -> Any:
    """Sum ``input_`` over the ranks and keep this rank's ``output.numel()`` slice.

    torch 2.12+'s ``reduce_scatter_single``, torch 2.6-2.11's ``reduce_scatter_tensor`` (the
    old name warns on torch 2.12+), as for :func:`all_gather_single`."""
    if _logging():
        import ds_comm

        return ds_comm.reduce_scatter_tensor(
            output, input_, group=group, async_op=async_op, log_name=log_name
        )
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(output, input_, group=group, async_op=async_op)


def all_to_all_single(
    output: torch.Tensor,
    input_: torch.Tensor,
    group: ProcessGroup | None = None,
    *,
    log_name: str = "zero_all_to_all",
) -> None:
    """Synchronous even all-to-all of dim-0 rows (logged under ``log_name`` when logging)."""
    if _logging():
        import ds_comm

        ds_comm.all_to_all_single(output, input_, group=group, log_name=log_name)
        return
    dist.all_to_all_single(output, input_, group=group)


def global_rank_of(group: ProcessGroup | None, rank_in_group: int) -> int:
    """Global rank of ``rank_in_group`` (torch's broadcast takes global ranks)."""
    if group is None or not (dist.is_available() and dist.is_initialized()):
        return rank_in_group
    return dist.get_global_rank(group, rank_in_group)
