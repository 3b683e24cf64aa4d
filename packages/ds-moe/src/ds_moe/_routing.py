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

from ds_moe._route_fused import place as fused_place


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
    #: the one-rank dispatch layout the fused placement writes on the way (``row``, ``dest``,
    #: ``token_of_row``, ``offs`` of ``_local_dispatch.LocalLayout``), else None
    local: tuple[torch.Tensor, ...] | None = None


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


#: most cells ranked by counting: its marks and running count move ~16 bytes per cell, so
#: past 2M cells (many experts times many tokens) one argsort of the assignments is cheaper
_COUNTED_RANK_MAX = 1 << 21


def _levels(n: int, num_tokens: int, device: torch.device) -> torch.Tensor:
    """``choice * S`` of every assignment ``a = choice * S + token``."""
    return torch.arange(n, device=device) // num_tokens * num_tokens


def _rank(cells: torch.Tensor, size: int) -> torch.Tensor:
    """The rank of each of the unique ``cells`` (ints in ``[0, size)``) among all of them.

    Up to ``_COUNTED_RANK_MAX`` a counting sort: a 0/1 mark per cell, one running count of
    the marks (1-D, which CUDA scans in parallel), read back at the cells; a handful of small
    kernels instead of a device sort. Beyond it, one argsort (same ranks).
    """
    if size <= _COUNTED_RANK_MAX:
        marks = torch.zeros(size, dtype=torch.int32, device=cells.device)
        marks.index_fill_(0, cells, 1)
        return marks.cumsum(0, dtype=torch.int64).index_select(0, cells) - 1
    order = torch.argsort(cells)
    ranks = torch.arange(cells.numel(), device=cells.device)
    # scatter rather than advanced indexing: never a host sync on CUDA
    return torch.empty_like(ranks).scatter_(0, order, ranks)


def gumbel_rsample(
    shape: tuple[int, ...] | torch.Size,
    device: torch.device | str,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Standard Gumbel(0, 1) samples (float32) of ``shape``, DeepSpeed's ``gumbel_rsample``:
    ``-log(-log(U))`` with ``U`` kept off 0 and 1 so no sample is infinite."""
    u = torch.rand(torch.Size(shape), device=device, dtype=torch.float32, generator=generator)
    return -torch.log(-torch.log(u.clamp_(min=1e-20, max=1.0 - 1e-7)))


def gumbel_like(t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    return gumbel_rsample(t.shape, t.device, generator=generator)


def _place(
    expert_index: torch.Tensor,
    num_experts: int,
    capacity_slots: int | None,
    token_priority: torch.Tensor | None,
    used_token: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    """``(position, order, kept [S*k], exp_counts, kept_counts)`` in torch ops: each
    assignment's slot in its expert by priority, what capacity keeps, the dispatch order."""
    num_tokens, k = expert_index.shape
    device = expert_index.device
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
    # Every assignment's rank in (expert, priority) order: the slot order of capacity.
    cell = flat_expert * span + priority
    rank = _rank(cell, num_experts * span)
    keep = None
    if capacity_slots is not None:
        # slot = rank - (assignments of the experts before); kept when slot < capacity
        starts = torch.cumsum(all_counts, 0) - all_counts
        keep = rank < (starts + capacity_slots).index_select(0, flat_expert)
    if flat_used is not None:
        # (a copy: for k = 1 ``flat_used`` may be the caller's own tensor)
        keep = flat_used.clone() if keep is None else keep & flat_used
    kept_counts = exp_counts if capacity_slots is None else exp_counts.clamp(max=capacity_slots)
    if keep is None:
        # everything kept: the order is (expert, priority) itself
        kept_flat = torch.ones(n, dtype=torch.bool, device=device)
        position = rank
    else:
        # kept ones first, then the dropped ones, each by (expert, priority)
        kept_flat = keep
        position = _rank(torch.where(keep, cell, cell + num_experts * span), 2 * num_experts * span)
    order = torch.empty_like(position).scatter_(0, position, torch.arange(n, device=device))
    return position, order, kept_flat, exp_counts, kept_counts


def route(
    logits: torch.Tensor,
    k: int,
    *,
    capacity_slots: int | None,
    selection_logits: torch.Tensor | None = None,
    token_priority: torch.Tensor | None = None,
    used_token: torch.Tensor | None = None,
    router_z_loss_coef: float = 0.0,
    fused: bool = False,
) -> Routing:
    """Route ``S`` tokens given their router ``logits`` [S, E].

    ``selection_logits`` (same shape, e.g. with Gumbel noise) choose the experts when given;
    the weights always come from ``softmax(logits)``. ``token_priority`` [S] is a permutation
    of ``0..S-1`` ranking tokens for capacity inside each choice level (RTS passes a random
    one). ``used_token`` [S] (bool or 0/1) excludes padding tokens from dispatch and counts.

    Weights: for k = 1 the token's gate probability (so the router gets a gradient, Switch);
    for k > 1 the top-k probabilities renormalised to sum to 1 before capacity is applied
    (GShard), so a choice's weight does not depend on whether other tokens took its slot.

    ``fused``: the capacity and placement in three Triton kernels (``_route_fused``, CUDA or
    the interpreter; the same integers), where no ``used_token`` is given.
    """
    if logits.dim() != 2:
        raise ValueError(f"route: logits must be [tokens, experts], got {tuple(logits.shape)}")
    num_tokens, num_experts = logits.shape
    gates = F.softmax(logits.float(), dim=-1)
    sel = gates if selection_logits is None else selection_logits
    expert_index = torch.topk(sel, k, dim=-1).indices  # [S, k]
    top_gates = gates.gather(1, expert_index)
    combine_weight = top_gates if k == 1 else top_gates / top_gates.sum(-1, keepdim=True)

    local = None
    if fused and used_token is None:
        placed = fused_place(expert_index, token_priority, num_experts, capacity_slots)
        placed, local = placed[:5], tuple(placed[5:])
    else:
        placed = _place(expert_index, num_experts, capacity_slots, token_priority, used_token)
    position, order, kept_flat, exp_counts, kept_counts = placed
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
        local=local,
    )
