"""The few collectives the MoE layer needs, over ``torch.distributed``.

Kept behind this module so the layer can move to ds_comm's logged collectives without touching
the dispatch code. The token all-to-all is an autograd function: its backward is the same
all-to-all with the split sizes swapped.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def exchange_counts(send: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """``send`` [P * n] (n counts for each peer) -> [P * n] (n counts from each peer)."""
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send.contiguous(), group=group)
    return recv


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        out_splits: list[int],
        in_splits: list[int],
        group: ProcessGroup,
    ) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty((sum(ctx.in_splits), *grad.shape[1:]))
        dist.all_to_all_single(
            out, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group
        )
        return out, None, None, None


def all_to_all(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: ProcessGroup
) -> torch.Tensor:
    """Rows ``x`` split by ``in_splits`` go to the group's ranks; ``out_splits`` come back."""
    return _AllToAll.apply(x, out_splits, in_splits, group)
