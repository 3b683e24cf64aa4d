"""The only module of ds-pipe that talks to torch.distributed.

ds-pipe's first version calls torch.distributed directly so it does not wait for ds-comm's
collectives; routing everything through these few functions means switching to ds_comm (and
its comms logging) later is a change to this file only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def backend() -> str:
    return str(dist.get_backend()) if is_initialized() else "none"


def new_group(ranks: Sequence[int], backend: str | None = None) -> ProcessGroup | None:
    """Create a group; only its members call this, each with the same ranks.

    Member-local synchronisation: creating a world-synchronised group costs a store barrier
    over every rank (seconds on a loaded machine, per group), and ranks outside the group
    have no use for its handle.
    """
    if not is_initialized():
        return None
    if get_rank() not in ranks:
        raise ValueError(f"rank {get_rank()} creates a group {list(ranks)} it is not part of")
    return dist.new_group(ranks=sorted(ranks), backend=backend, use_local_synchronization=True)


def batch_send_recv(
    ops: Sequence[tuple[bool, torch.Tensor, int]], group: ProcessGroup | None
) -> list[dist.Work]:
    """Post ``(is_send, tensor, global peer rank)`` operations as one batch; return the works."""
    if not ops:
        return []
    p2p = [
        dist.P2POp(dist.isend if is_send else dist.irecv, tensor, peer, group)
        for is_send, tensor, peer in ops
    ]
    return list(dist.batch_isend_irecv(p2p))


def isend(tensor: torch.Tensor, peer: int, group: ProcessGroup | None) -> dist.Work:
    return dist.isend(tensor, dst=peer, group=group)


def recv(tensor: torch.Tensor, peer: int, group: ProcessGroup | None) -> None:
    dist.recv(tensor, src=peer, group=group)


def all_reduce(tensor: torch.Tensor, group: ProcessGroup | None) -> None:
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)


def broadcast(tensor: torch.Tensor, src: int, group: ProcessGroup | None) -> None:
    dist.broadcast(tensor, src=src, group=group)
