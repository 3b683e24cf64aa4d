"""ds-moe 0.1.3's routing and ep=1 layout, kept verbatim as the before-image for the tests.

0.1.4 computes the same decisions with fewer kernels (no sorts, the layout from the routing's
positions); the tests check that every integer and every weight is bitwise the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ds_moe._local_dispatch import LocalLayout
from ds_moe._routing import Routing, _count, load_balancing_loss, router_z_loss


def route_before(
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

    (``fused``: 0.1.10's switch for its placement kernels, accepted so the gate can call this
    in its place; 0.1.3 had only the torch path, which runs whatever it says.)

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
    # Assignment a = j * S + s; flat views in that order.
    flat_expert = expert_index.t().reshape(-1)
    if used_token is not None:
        used = used_token.reshape(-1).to(device=device, dtype=torch.bool)
        if used.numel() != num_tokens:
            raise ValueError(
                f"used_token has {used.numel()} entries for {num_tokens} tokens; pass one "
                "0/1 flag per token (the input's shape without its hidden dimension)"
            )
        flat_used = used.repeat(k)
    else:
        flat_used = torch.ones(n, dtype=torch.bool, device=device)
    exp_counts = _count(flat_expert, num_experts, None if used_token is None else flat_used)

    tok_rank = (
        torch.arange(num_tokens, device=device)
        if token_priority is None
        else token_priority.to(device=device, dtype=torch.int64)
    )
    choice = torch.arange(n, device=device) // num_tokens  # a = choice * S + token
    priority = choice * num_tokens + tok_rank.repeat(k)  # unique in [0, n)
    # Unused tokens sort after every used one of the same expert so they never take a slot.
    priority = torch.where(flat_used, priority, priority + n)

    # Sort 1: group by expert, priority order inside; the rank inside the group is the slot.
    order1 = torch.argsort(flat_expert * (2 * n) + priority)
    all_counts = exp_counts if used_token is None else _count(flat_expert, num_experts)
    starts = torch.cumsum(all_counts, 0) - all_counts
    # index_select/scatter rather than advanced indexing: never a host sync on CUDA
    slot = torch.arange(n, device=device) - starts.index_select(
        0, flat_expert.index_select(0, order1)
    )
    keep_sorted = flat_used.index_select(0, order1)
    if capacity_slots is not None:
        keep_sorted = keep_sorted & (slot < capacity_slots)
    # Sort 2 (stable partition): kept assignments first, keeping sort 1's order.
    partition = (~keep_sorted).to(torch.int64) * n + torch.arange(n, device=device)
    order = order1.index_select(0, torch.argsort(partition))
    kept_flat = torch.empty(n, dtype=torch.bool, device=device).scatter_(0, order1, keep_sorted)
    kept_counts = exp_counts if capacity_slots is None else exp_counts.clamp(max=capacity_slots)

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
    )


def local_layout_before(routing: Routing) -> LocalLayout:
    num_tokens, k = routing.expert_index.shape
    n = num_tokens * k
    device = routing.order.device
    order = routing.order  # kept assignments first, grouped by expert; then the dropped ones
    kept_total = routing.kept_counts.sum()
    pos = torch.arange(n, device=device)
    # position i of ``order`` is buffer row i + 1 while i < kept_total; dropped -> sentinel 0
    row_sorted = torch.where(pos < kept_total, pos + 1, torch.zeros_like(pos))
    row_flat = torch.empty_like(row_sorted).scatter_(0, order, row_sorted)  # a = j*S + s
    row = row_flat.view(k, num_tokens).t().contiguous()
    # (0.1.10's field, for the fused combine: every choice's buffer row, dropped ones too)
    dest_flat = torch.empty_like(pos).scatter_(0, order, pos + 1)
    dest = dest_flat.view(k, num_tokens).t().contiguous()
    token_sorted = order if k == 1 else order % num_tokens
    token_of_row = torch.cat([token_sorted.new_zeros(1), token_sorted])
    offs = (torch.cumsum(routing.kept_counts, 0) + 1).to(torch.int32)
    return LocalLayout(
        row=row, token_of_row=token_of_row, assignment_of_row=order, offs=offs, dest=dest
    )
