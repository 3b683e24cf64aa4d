"""Top-k routing as pure tensor functions: selection, capacity, priority, losses.

Nothing here synchronises with the host or talks to other ranks, so the whole router runs in
one process in the tests and overlaps with the GPU's queue in training.

An *assignment* is one (token, choice) pair, numbered ``a = choice * S + token`` for ``S``
tokens: all first choices, then all second choices, ... This numbering is also the priority
order for capacity (GShard): every token's first choice is served before any second choice,
and inside one choice level tokens are served in order, or in a random order with RTS.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class Routing:
    """The router's decision for ``S`` tokens and ``E`` experts (all tensors on one device)."""

    #: [S, k] int64: the expert of each token's choice 0..k-1
    expert_index: torch.Tensor
    #: [S, k] float32: how much each choice contributes to the token's output (differentiable)
    combine_weight: torch.Tensor
    #: [S, k] bool: the choice got a slot (capacity) and the token is used
    kept: torch.Tensor
    #: [S*k] int64: assignment ids, kept ones first grouped by expert in priority order,
    #: then the dropped ones; the first ``kept_counts.sum()`` entries are what gets dispatched
    order: torch.Tensor
    #: [E] int64: kept assignments per expert
    kept_counts: torch.Tensor
    #: [E] int64: assignments per expert before capacity (what DeepSpeed reports)
    exp_counts: torch.Tensor
    #: scalar float32: load-balancing loss plus router_z_loss_coef * z-loss
    l_aux: torch.Tensor
    #: slots per expert on this rank, None when dropless
    capacity: int | None
    #: [S*k] int64: where each assignment sits in ``order`` (its inverse permutation)
    position: torch.Tensor | None = None


def capacity(num_tokens: int, num_experts: int, k: int, factor: float, min_capacity: int) -> int:
    """Slots per expert: ``ceil(k * tokens * factor / experts)``, at least ``min_capacity``.

    For k = 1 and 2 this is DeepSpeed's top1/top2 capacity (top2 doubles the factor).
    """
    return max(math.ceil(k * num_tokens * factor / num_experts), min_capacity)


def load_balancing_loss(gates: torch.Tensor, exp_counts: torch.Tensor, k: int) -> torch.Tensor:
    """GShard/Switch auxiliary loss ``E * sum_e mean_gate_e * fraction_e``.

    ``fraction_e`` is the share of the ``k * S`` assignments that chose expert ``e`` (before
    capacity), so the loss is 1.0 for a perfectly uniform router for any k; for k = 1 it is
    the Switch Transformer loss and equals DeepSpeed's ``topkgating``.
    """
    num_tokens, num_experts = gates.shape
    me = gates.float().mean(dim=0)
    ce = exp_counts.to(me.dtype) / max(num_tokens * k, 1)
    return num_experts * torch.sum(me * ce)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss ``mean_s logsumexp(logits_s)^2``: keeps the logits small."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def _count(index: torch.Tensor, n: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``bincount`` without its device-to-host sync (CUDA bincount reads ``max()`` on the host)."""
    src = torch.ones_like(index) if weight is None else weight.to(index.dtype)
    return torch.zeros(n, dtype=index.dtype, device=index.device).scatter_add_(0, index, src)


#: largest ``priority span * experts`` ranked by one [span, E] cumulative count (int32, so
#: at most 64 MiB); beyond it a sort ranks the assignments (same result, more kernels)
_COUNTED_RANK_MAX = 1 << 24


def _levels(n: int, num_tokens: int, device: torch.device) -> torch.Tensor:
    """``choice * S`` of every assignment ``a = choice * S + token``."""
    return torch.arange(n, device=device) // num_tokens * num_tokens


def _rank_by_counting(
    flat_expert: torch.Tensor, priority: torch.Tensor, span: int, num_experts: int
) -> torch.Tensor:
    """Each assignment's rank among its expert's assignments in priority order.

    One-hot rows placed at their priority, counted down the priority axis: a handful of
    elementwise kernels instead of a device sort (priorities are unique in ``[0, span)``).
    """
    cell = priority * num_experts + flat_expert
    hits = torch.zeros(span * num_experts, dtype=torch.int32, device=priority.device)
    hits.index_fill_(0, cell, 1)
    counted = hits.view(span, num_experts).cumsum(0, dtype=torch.int32).view(-1)
    return counted.index_select(0, cell).to(torch.int64) - 1


def _rank_by_sorting(
    flat_expert: torch.Tensor, priority: torch.Tensor, span: int, all_counts: torch.Tensor
) -> torch.Tensor:
    """``_rank_by_counting`` by one sort, for many experts or tokens."""
    n = flat_expert.numel()
    order1 = torch.argsort(flat_expert * span + priority)
    starts = torch.cumsum(all_counts, 0) - all_counts
    # index_select/scatter rather than advanced indexing: never a host sync on CUDA
    sorted_rank = torch.arange(n, device=flat_expert.device) - starts.index_select(
        0, flat_expert.index_select(0, order1)
    )
    return torch.empty_like(sorted_rank).scatter_(0, order1, sorted_rank)


def gumbel_like(t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    u = torch.rand(t.shape, device=t.device, dtype=torch.float32, generator=generator)
    return -torch.log(-torch.log(u.clamp_(min=1e-20, max=1.0 - 1e-7)))


def route(
    logits: torch.Tensor,
    k: int,
    *,
    capacity_slots: int | None,
    selection_logits: torch.Tensor | None = None,
    token_priority: torch.Tensor | None = None,
    used_token: torch.Tensor | None = None,
    router_z_loss_coef: float = 0.0,
) -> Routing:
    """Route ``S`` tokens given their router ``logits`` [S, E].

    ``selection_logits`` (same shape, e.g. with Gumbel noise) choose the experts when given;
    the weights always come from ``softmax(logits)``. ``token_priority`` [S] is a permutation
    of ``0..S-1`` ranking tokens for capacity inside each choice level (RTS passes a random
    one). ``used_token`` [S] (bool or 0/1) excludes padding tokens from dispatch and counts.

    Weights: for k = 1 the token's gate probability (so the router gets a gradient, Switch);
    for k > 1 the top-k probabilities renormalised to sum to 1 before capacity is applied
    (GShard), so a choice's weight does not depend on whether other tokens took its slot.
    """
    if logits.dim() != 2:
        raise ValueError(f"route: logits must be [tokens, experts], got {tuple(logits.shape)}")
    num_tokens, num_experts = logits.shape
    device = logits.device
    gates = F.softmax(logits.float(), dim=-1)
    sel = gates if selection_logits is None else selection_logits
    expert_index = torch.topk(sel, k, dim=-1).indices  # [S, k]
    top_gates = gates.gather(1, expert_index)
    combine_weight = top_gates if k == 1 else top_gates / top_gates.sum(-1, keepdim=True)

    n = num_tokens * k
    # Assignment a = j * S + s; flat views in that order (a copy only for k > 1).
    flat_expert = expert_index.view(-1) if k == 1 else expert_index.t().reshape(-1)
    flat_used = None
    if used_token is not None:
        used = used_token.reshape(-1).to(device=device, dtype=torch.bool)
        if used.numel() != num_tokens:
            raise ValueError(
                f"used_token has {used.numel()} entries for {num_tokens} tokens; pass one "
                "0/1 flag per token (the input's shape without its hidden dimension)"
            )
        flat_used = used if k == 1 else used.repeat(k)
    exp_counts = _count(flat_expert, num_experts, flat_used)
    all_counts = exp_counts if flat_used is None else _count(flat_expert, num_experts)

    # Capacity priority, unique in [0, n): choice level first, then token rank.
    if token_priority is None:
        priority = torch.arange(n, device=device)
    else:
        tok_rank = token_priority.to(device=device, dtype=torch.int64)
        priority = tok_rank if k == 1 else _levels(n, num_tokens, device) + tok_rank.repeat(k)
    if flat_used is not None:
        # Unused tokens rank after every used one of the same expert: never take a slot.
        priority = torch.where(flat_used, priority, priority + n)
    span = n if flat_used is None else 2 * n
    if span * num_experts <= _COUNTED_RANK_MAX:
        slot = _rank_by_counting(flat_expert, priority, span, num_experts)
    else:
        slot = _rank_by_sorting(flat_expert, priority, span, all_counts)

    keep = slot < capacity_slots if capacity_slots is not None else None
    if flat_used is not None:
        keep = flat_used if keep is None else keep & flat_used
    kept_counts = exp_counts if capacity_slots is None else exp_counts.clamp(max=capacity_slots)
    # Position of every assignment in ``order``: the kept ones by (expert, priority), then the
    # dropped ones by (expert, priority). Inside an expert the kept ones are the lowest ranks.
    kept_starts = torch.cumsum(kept_counts, 0) - kept_counts
    position = kept_starts.index_select(0, flat_expert) + slot
    if keep is None:
        kept_flat = torch.ones(n, dtype=torch.bool, device=device)
    else:
        kept_flat = keep
        dropped = all_counts - kept_counts
        drop_base = torch.cumsum(dropped, 0) - dropped - kept_counts + kept_counts.sum()
        position = torch.where(keep, position, drop_base.index_select(0, flat_expert) + slot)
    order = torch.empty_like(position).scatter_(0, position, torch.arange(n, device=device))

    l_aux = load_balancing_loss(gates, exp_counts, k)
    if router_z_loss_coef > 0:
        l_aux = l_aux + router_z_loss_coef * router_z_loss(logits)
    return Routing(
        expert_index=expert_index,
        combine_weight=combine_weight,
        kept=kept_flat.view(k, num_tokens).t(),
        order=order,
        kept_counts=kept_counts,
        exp_counts=exp_counts,
        l_aux=l_aux,
        capacity=capacity_slots,
        position=position,
    )
