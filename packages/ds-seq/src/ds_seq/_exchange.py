"""The Ulysses exchange: one all-to-all that trades a sequence shard for a head shard.

Before attention every rank holds ``s/p`` tokens of all ``H`` heads; the exchange sends head
slice ``j`` of its tokens to rank ``j`` and receives every rank's tokens of its own head slice,
so it ends with all ``s`` tokens of ``H_j`` heads. After attention the inverse exchange moves the
context back. Both directions are one ``all_to_all_single`` over a flat buffer whose per-rank
pieces may differ in size, so head counts that do not divide the group (GQA with few KV heads)
and unequal head slices need no padding.

The autograd function's backward is the inverse exchange of the incoming gradient: the forward
is a permutation of elements across ranks, so its adjoint is the reverse permutation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def exchange(
    x: Tensor,
    split_dim: int,
    concat_dim: int,
    send_sizes: Sequence[int],
    recv_sizes: Sequence[int],
    group: Any,
) -> Tensor:
    """Split ``x`` along ``split_dim`` into ``send_sizes`` pieces, send piece ``j`` to rank ``j``
    of ``group`` and concatenate what arrives along ``concat_dim`` (rank ``i``'s piece being
    ``recv_sizes[i]`` long there). Not differentiable by itself: see :class:`SeqExchange`."""
    world = len(send_sizes)
    if x.shape[split_dim] != sum(send_sizes):
        raise ValueError(
            f"exchange: dim {split_dim} of a tensor of shape {tuple(x.shape)} is "
            f"{x.shape[split_dim]} but the pieces sent add up to {sum(send_sizes)} ({list(send_sizes)})"
        )
    if world == 1:
        return x
    moved = x.movedim(split_dim, 0).contiguous()
    inner = moved[0].numel() if moved.shape[0] else 0
    # every piece received has this rank's share along split_dim and the sender's length along
    # concat_dim; its other dims are this tensor's
    mine = send_sizes[dist.get_rank(group)]
    shape = list(moved.shape)
    concat_moved = concat_dim + 1 if concat_dim < split_dim else concat_dim
    piece_shapes = []
    for n in recv_sizes:
        s = list(shape)
        s[0] = mine
        s[concat_moved] = n
        piece_shapes.append(s)
    recv_numel = [int(torch.Size(s).numel()) for s in piece_shapes]
    out = torch.empty(sum(recv_numel), dtype=x.dtype, device=x.device)
    dist.all_to_all_single(
        out,
        moved.reshape(-1),
        output_split_sizes=recv_numel,
        input_split_sizes=[n * inner for n in send_sizes],
        group=group,
    )
    pieces = [
        p.view(s).movedim(0, split_dim)
        for p, s in zip(out.split(recv_numel), piece_shapes, strict=True)
    ]
    return torch.cat(pieces, dim=concat_dim)


class SeqExchange(torch.autograd.Function):
    """Differentiable :func:`exchange`; backward runs the inverse exchange."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        split_dim: int,
        concat_dim: int,
        send_sizes: tuple[int, ...],
        recv_sizes: tuple[int, ...],
        group: Any,
    ) -> Tensor:
        ctx.args = (split_dim, concat_dim, send_sizes, recv_sizes, group)
        return exchange(x, split_dim, concat_dim, send_sizes, recv_sizes, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        split_dim, concat_dim, send_sizes, recv_sizes, group = ctx.args
        # the inverse splits what forward concatenated and concatenates what it split
        back = exchange(grad, concat_dim, split_dim, recv_sizes, send_sizes, group)
        return back, None, None, None, None, None


def seq_exchange(
    x: Tensor,
    split_dim: int,
    concat_dim: int,
    send_sizes: Sequence[int],
    recv_sizes: Sequence[int],
    group: Any,
) -> Tensor:
    """Differentiable exchange (identity on a group of one)."""
    if len(send_sizes) == 1:
        return x
    return SeqExchange.apply(x, split_dim, concat_dim, tuple(send_sizes), tuple(recv_sizes), group)
