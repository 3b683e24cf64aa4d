"""Token permutation for one rank's own experts (ep_size 1) without a host sync.

All sizes here are static (known from the input's shape), so nothing waits for the device:

- the expert buffer has ``1 + S*k`` rows for ``S`` tokens and ``k`` choices. Row 0 is a
  *sentinel* (a copy of token 0, computed by expert 0 with weight 0), rows ``1..kept`` hold the
  kept assignments grouped by expert in priority order, the rows after them are *dead* (the
  grouped GEMM stops at the last group's end, so they are never computed);
- group ends ``offs = 1 + cumsum(kept_counts)`` stay on the device and feed the grouped GEMM
  directly (no padding to capacity, no padding of groups);
- a dropped assignment points at the sentinel, whose gradient is exactly zero (weight 0), so
  every gather below reads only computed rows and no garbage from a dead row reaches a token.

Each direction is one gather, forward and backward alike (deterministic, no atomics, no
zero-filled [S, k, capacity] dispatch tensors): permute ``buf = x[token_of_row]``; combine
``out[s] = sum_j w[s, j] * y[row[s, j]]`` as one batched [1 x k] @ [k x d] product per token.
On CUDA with Triton, ``fused=True`` runs the combine and the permutation's backward as single
passes instead (``_combine``), with the same values.
"""

from __future__ import annotations

import dataclasses

import torch

from ds_moe._combine import fused_combine, fused_permute
from ds_moe._routing import Routing


@dataclasses.dataclass(frozen=True)
class LocalLayout:
    """Where every assignment sits in the expert buffer (all on the routing's device)."""

    #: [S, k] int64: buffer row of each token's choice (0, the sentinel, when dropped)
    row: torch.Tensor
    #: [1 + S*k] int64: the token each buffer row was copied from
    token_of_row: torch.Tensor
    #: [S*k] int64: assignment id (``choice * S + token``) of buffer rows 1..S*k
    assignment_of_row: torch.Tensor
    #: [E] int32: end of each expert's rows in the buffer (group 0 includes the sentinel)
    offs: torch.Tensor
    #: [S, k] int64: the buffer row of each token's choice, dropped or not (a dropped one's is
    #: a dead row): every row 1..S*k once, where the fused combine writes its gradient
    dest: torch.Tensor


def local_layout(routing: Routing) -> LocalLayout:
    num_tokens, k = routing.expert_index.shape
    order = routing.order  # kept assignments first, grouped by expert; then the dropped ones
    if routing.local is not None:  # written by the fused placement (``_route_kernels``)
        row, dest, token_of_row, offs = routing.local
        return LocalLayout(row=row, token_of_row=token_of_row, assignment_of_row=order,
                           offs=offs, dest=dest)  # fmt: skip
    position = routing.position
    if position is None:  # a Routing built elsewhere: invert ``order``
        pos = torch.arange(order.numel(), device=order.device)
        position = torch.empty_like(order).scatter_(0, order, pos)
    # assignment a = j*S + s sits at position p of ``order``: buffer row p + 1 when kept,
    # the sentinel 0 when dropped
    kept = routing.kept if k == 1 else routing.kept.t()  # [k, S] view: a-major
    dest_flat = position + 1
    row_flat = torch.where(kept.reshape(-1), dest_flat, 0)
    row = _token_major(row_flat, num_tokens, k)
    token_sorted = order if k == 1 else order % num_tokens
    token_of_row = torch.cat([token_sorted.new_zeros(1), token_sorted])
    offs = torch.cumsum(routing.kept_counts, 0, dtype=torch.int32).add_(1)
    return LocalLayout(row=row, token_of_row=token_of_row, assignment_of_row=order, offs=offs,
                       dest=_token_major(dest_flat, num_tokens, k))  # fmt: skip


def _token_major(flat: torch.Tensor, num_tokens: int, k: int) -> torch.Tensor:
    """[S, k] from a flat tensor in assignment order ``a = choice * S + token``."""
    return flat.view(num_tokens, 1) if k == 1 else flat.view(k, num_tokens).t().contiguous()


class _Permute(torch.autograd.Function):
    """``buf = x[token_of_row]``; backward sums each token's rows (dropped: the zero sentinel)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, token_of_row: torch.Tensor, row: torch.Tensor):
        ctx.save_for_backward(row)
        return x.index_select(0, token_of_row)

    @staticmethod
    def backward(ctx, grad_buf: torch.Tensor):
        (row,) = ctx.saved_tensors
        num_tokens, k = row.shape
        g = grad_buf.index_select(0, row.reshape(-1))
        if k > 1:
            g = g.view(num_tokens, k, -1).sum(1)
        return g, None, None


class _Combine(torch.autograd.Function):
    """``out[s] = sum_j weight[s, j] * y[row[s, j]]`` and its exact backward.

    ``weight`` is the combine weight already zeroed for dropped choices (their rows point at
    the sentinel, a finite row, so 0 * row stays 0). The backward writes each buffer row's
    gradient by one gather of the output gradient (``weight_of_row * grad_out[token_of_row]``;
    sentinel and dead rows get 0), and the weights' gradient as one batched dot product.
    """

    @staticmethod
    def forward(
        ctx,
        y: torch.Tensor,
        weight: torch.Tensor,
        row: torch.Tensor,
        token_of_row: torch.Tensor,
        assignment_of_row: torch.Tensor,
    ):
        num_tokens, k = row.shape
        g = y.index_select(0, row.reshape(-1)).view(num_tokens, k, -1)
        w = weight.to(y.dtype)
        if k == 1:
            out = g.view(num_tokens, -1) * w
        else:
            out = torch.bmm(w.unsqueeze(1), g).view(num_tokens, -1)
        ctx.save_for_backward(g, weight, token_of_row, assignment_of_row)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        g, weight, token_of_row, assignment_of_row = ctx.saved_tensors
        num_tokens, k = weight.shape
        grad_out = grad_out.contiguous()
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.bmm(g, grad_out.unsqueeze(2)).view(num_tokens, k).to(weight.dtype)
        # weight of each buffer row: the sentinel's is 0, and so is every dropped (dead) row's
        w_flat = weight.detach().t().reshape(-1)
        w_row = torch.cat([w_flat.new_zeros(1), w_flat.index_select(0, assignment_of_row)])
        grad_y = grad_out.index_select(0, token_of_row) * w_row.to(grad_out.dtype).unsqueeze(1)
        return grad_y, grad_w, None, None, None


def permute(x: torch.Tensor, layout: LocalLayout, *, fused: bool = False) -> torch.Tensor:
    """The expert buffer [1 + S*k, d] for tokens ``x`` [S, d]; ``fused``: the backward sums
    each token's rows in one pass (k > 1; for k = 1 it is one gather either way)."""
    if fused and layout.row.shape[1] > 1:
        return fused_permute(x, layout.token_of_row, layout.row)
    return _Permute.apply(x, layout.token_of_row, layout.row)


def combine(
    y: torch.Tensor, routing: Routing, layout: LocalLayout, *, fused: bool = False
) -> torch.Tensor:
    """Per-token output [S, d] from the experts' output buffer ``y`` [1 + S*k, d]; ``fused``:
    one pass each way (``_combine``: CUDA with Triton, bf16/fp16)."""
    weight = routing.combine_weight * routing.kept
    if fused:
        return fused_combine(y, weight, layout.row, layout.dest)
    return _Combine.apply(y, weight, layout.row, layout.token_of_row, layout.assignment_of_row)
