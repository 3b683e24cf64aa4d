"""Moving routed tokens to their experts and back.

One forward does, per rank:

1. gather the kept assignments' token rows, grouped by global expert (so by destination rank);
2. all-to-all them over the expert-parallel group with variable split sizes (only kept tokens
   travel: no capacity padding on the wire or in the GEMMs);
3. regroup what arrived ([source rank][local expert]) into [local expert][source rank], padded
   per expert to what the grouped GEMM wants, and run the local experts;
4. undo 3 and 2, scale each row by its combine weight and add the rows back per token.

Split sizes must be known on the host for the all-to-all, so the plan costs exactly one
device-to-host copy per forward (the counts); the backward reuses the plan and never syncs.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.distributed import ProcessGroup

from ds_moe._comm import all_to_all, exchange_counts
from ds_moe._routing import Routing


def _round_up(n: int, align: int) -> int:
    return -(-n // align) * align


@dataclasses.dataclass(frozen=True)
class DispatchPlan:
    """Host-side sizes of one forward."""

    #: assignments this rank sends (the first n_kept entries of Routing.order)
    n_kept: int
    #: rows sent to / received from each rank of the expert-parallel group
    send_splits: list[int]
    recv_splits: list[int]
    #: rows received per (source rank, local expert), source-major
    recv_chunks: list[int]
    #: rows per local expert in the expert buffer, after padding
    group_sizes: list[int]
    #: per-expert assignment counts before capacity (returned to the user)
    exp_counts: list[int]
    #: whether the received rows are already the expert buffer (no regroup, no padding)
    identity_layout: bool


def make_plan(
    routing: Routing,
    ep_size: int,
    ep_group: ProcessGroup | None,
    num_local_experts: int,
    align: int,
) -> DispatchPlan:
    num_experts = routing.kept_counts.numel()
    kept = routing.kept_counts
    if ep_size > 1:
        assert ep_group is not None
        recv = exchange_counts(kept, ep_group)
        host = torch.cat([kept, routing.exp_counts, recv]).tolist()
        kept_h, exp_h, recv_h = (
            host[:num_experts],
            host[num_experts : 2 * num_experts],
            host[2 * num_experts :],
        )
    else:
        host = torch.cat([kept, routing.exp_counts]).tolist()
        kept_h, exp_h = host[:num_experts], host[num_experts:]
        recv_h = kept_h
    el = num_local_experts
    send_splits = [sum(kept_h[r * el : (r + 1) * el]) for r in range(ep_size)]
    recv_splits = [sum(recv_h[r * el : (r + 1) * el]) for r in range(ep_size)]
    per_expert = [sum(recv_h[r * el + e] for r in range(ep_size)) for e in range(el)]
    if align > 1:
        # At least one aligned block per expert: empty groups trip some grouped-GEMM releases.
        group_sizes = [max(_round_up(n, align), align) for n in per_expert]
    else:
        group_sizes = per_expert
    identity = (ep_size == 1 or el == 1) and group_sizes == per_expert
    return DispatchPlan(
        n_kept=sum(kept_h),
        send_splits=send_splits,
        recv_splits=recv_splits,
        recv_chunks=recv_h,
        group_sizes=group_sizes,
        exp_counts=exp_h,
        identity_layout=identity,
    )


def _expert_layout_index(
    plan: DispatchPlan, num_local_experts: int, device: torch.device
) -> torch.Tensor:
    """For each received row, its row in the expert buffer."""
    el = num_local_experts
    ep = len(plan.recv_splits)
    expert_start = [0] * el
    for e in range(1, el):
        expert_start[e] = expert_start[e - 1] + plan.group_sizes[e - 1]
    fill = list(expert_start)
    delta, src_pos = [], 0
    for r in range(ep):
        for e in range(el):
            n = plan.recv_chunks[r * el + e]
            delta.append(fill[e] - src_pos)
            fill[e] += n
            src_pos += n
    sizes = torch.tensor(plan.recv_chunks, dtype=torch.int64).to(device, non_blocking=True)
    delta_t = torch.tensor(delta, dtype=torch.int64).to(device, non_blocking=True)
    total = sum(plan.recv_chunks)
    return torch.arange(total, device=device) + torch.repeat_interleave(
        delta_t, sizes, output_size=total
    )


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` on the way back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def _run_experts(experts, x: torch.Tensor, group_sizes: list[int], ep: int) -> torch.Tensor:
    """The local experts, with their parameter gradients divided by ``ep``.

    Through the all-to-all backward an expert's owner accumulates the gradient contributions
    of all ``ep`` ranks of its expert-parallel group. Scaling them by 1/ep makes the local
    expert gradient a per-rank mean, so averaging every gradient over the group it is reduced
    over (the expert-data-parallel group here, the data-parallel group for dense parameters)
    gives the gradient of the mean loss: the one rule a ZeRO or DDP-style reducer needs. The
    input gradient is scaled back by ep (exact for power-of-two ep), so activations' gradients
    are untouched; both scalings act on activations, so any expert module works and ZeRO-3's
    parameter gathering is not involved.
    """
    if ep == 1:
        return experts(x, group_sizes)
    y = experts(_ScaleGrad.apply(x, float(ep)), group_sizes)
    return _ScaleGrad.apply(y, 1.0 / ep)


def dispatch_and_combine(
    x: torch.Tensor,
    routing: Routing,
    plan: DispatchPlan,
    experts,
    ep_group: ProcessGroup | None,
) -> torch.Tensor:
    """The MoE output [S, M] for tokens ``x`` [S, M] (zero for tokens with no kept choice)."""
    num_tokens, hidden = x.shape
    k = routing.expert_index.shape[1]
    assign = routing.order[: plan.n_kept]
    token = assign % num_tokens if k > 1 else assign
    send = x.index_select(0, token)

    ep = len(plan.send_splits)
    recv = (
        all_to_all(send, plan.recv_splits, plan.send_splits, ep_group, "moe_dispatch")
        if ep > 1
        else send
    )

    if plan.identity_layout:
        y = _run_experts(experts, recv, plan.group_sizes, ep)
    else:
        dest = _expert_layout_index(plan, experts.num_local_experts, x.device)
        buf = recv.new_zeros(sum(plan.group_sizes), hidden).index_copy(0, dest, recv)
        y = _run_experts(experts, buf, plan.group_sizes, ep).index_select(0, dest)

    back = (
        all_to_all(y, plan.send_splits, plan.recv_splits, ep_group, "moe_combine") if ep > 1 else y
    )
    weight = routing.combine_weight.t().reshape(-1).index_select(0, assign)
    back = back * weight.to(back.dtype).unsqueeze(1)
    out = back.new_zeros(num_tokens * k, back.shape[1]).index_copy(0, assign, back)
    return out if k == 1 else out.view(k, num_tokens, -1).sum(0)
