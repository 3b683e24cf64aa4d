"""The few collectives the MoE layer needs, through ds_comm (torch.distributed names, logged).

The token all-to-all is an autograd function: its backward is the same all-to-all with the
split sizes swapped. Each call carries a log name (``moe_counts``, ``moe_dispatch``,
``moe_combine``, and ``_bwd`` for the backward ones) so ds_comm's comms logger tells the MoE
traffic apart from the rest.
"""

from __future__ import annotations

import torch
from torch.distributed import ProcessGroup

import ds_comm


def exchange_counts(send: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """``send`` [P * n] (n counts for each peer) -> [P * n] (n counts from each peer)."""
    recv = torch.empty_like(send)
    ds_comm.all_to_all_single(recv, send.contiguous(), group=group, log_name="moe_counts")
    return recv


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        out_splits: list[int],
        in_splits: list[int],
        group: ProcessGroup,
        name: str,
    ) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group, ctx.name = out_splits, in_splits, group, name
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        ds_comm.all_to_all_single(
            out, x.contiguous(), out_splits, in_splits, group=group, log_name=name
        )
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty((sum(ctx.in_splits), *grad.shape[1:]))
        ds_comm.all_to_all_single(
            out,
            grad.contiguous(),
            ctx.in_splits,
            ctx.out_splits,
            group=ctx.group,
            log_name=ctx.name + "_bwd",
        )
        return out, None, None, None, None


def all_to_all(
    x: torch.Tensor,
    out_splits: list[int],
    in_splits: list[int],
    group: ProcessGroup,
    name: str = "moe_all_to_all",
) -> torch.Tensor:
    """Rows ``x`` split by ``in_splits`` go to the group's ranks; ``out_splits`` come back."""
    return _AllToAll.apply(x, out_splits, in_splits, group, name)
