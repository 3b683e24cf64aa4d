"""DeepSpeed's functional gating API (``deepspeed.moe.sharded_moe``) on dense GShard tensors.

``top1gating`` / ``top2gating`` / ``topkgating`` return DeepSpeed's
``(l_aux, combine_weights [S, E, C], dispatch_mask [S, E, C], exp_counts [E])`` (or, with
``sparse_routes=True``, its ``(l_aux, capacity, E, indices [k, S], locations [k, S],
gates [k, S], exp_counts)``), with DeepSpeed's capacity, drop and weight rules, for code that
calls them directly. ds-moe's own layer routes with :func:`ds_moe.route` instead (no [S, E, C]
tensors). Tensor-parallel capacity padding needs an mpu, which ds-moe does not have (tp = 1).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ds_moe._routing import gumbel_rsample

USE_EINSUM = True


def multiplicative_jitter(x: Tensor, device: torch.device, epsilon: float = 1e-2) -> Tensor:
    """``x`` times U(1 - epsilon, 1 + epsilon) noise (Switch Transformer's input jitter)."""
    if epsilon == 0:
        return x
    noise = torch.empty(x.shape, device=device, dtype=x.dtype).uniform_(
        1.0 - epsilon, 1.0 + epsilon
    )
    return x * noise


def einsum(rule: str, a: Tensor, b: Tensor) -> Tensor:
    """``torch.einsum`` (DeepSpeed keeps hand-written forms behind ``USE_EINSUM = False``)."""
    return torch.einsum(rule, a, b)


def _capacity(gates: Tensor, capacity_factor: Tensor, min_capacity: Tensor) -> Tensor:
    num_tokens, num_experts = gates.shape
    capacity = torch.ceil((num_tokens / num_experts) * capacity_factor).to(torch.int64)
    return torch.maximum(capacity, min_capacity.to(torch.int64))


def _max_over_group(value: Tensor, ep_group) -> Tensor:
    if ep_group is not None and dist.is_initialized() and dist.get_world_size(ep_group) > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=ep_group)
    return value


def refuse_tutel(use_tutel: bool) -> None:
    """DeepSpeed's ``use_tutel`` switch (for the layer and the gating functions): ds-moe has
    no Tutel kernels, its own grouped-GEMM dispatch takes their place."""
    if use_tutel:
        raise ValueError(
            "use_tutel=True: ds-moe has no Tutel kernels (its own grouped-GEMM dispatch "
            "replaces them); pass use_tutel=False (the default)"
        )


def top1gating(
    logits: Tensor,
    capacity_factor: float,
    min_capacity: int,
    used_token: Tensor | None = None,
    noisy_gate_policy: str | None = None,
    drop_tokens: bool = True,
    use_rts: bool = True,
    ep_group: dist.ProcessGroup | None = None,
    sparse_routes: bool = False,
    use_tutel: bool = False,
) -> tuple:
    """Top-1 gating: Switch loss, RTS picks which tokens keep a slot (random, or the first)."""
    refuse_tutel(use_tutel)
    if noisy_gate_policy == "RSample":
        logits_w_noise = logits + gumbel_rsample(logits.shape, device=logits.device)
    gates = F.softmax(logits, dim=1)
    capacity = _capacity(gates, torch.tensor(capacity_factor), torch.tensor(min_capacity))
    indices1_s = torch.argmax(logits_w_noise if noisy_gate_policy == "RSample" else gates, dim=1)
    num_experts = int(gates.shape[1])
    mask1 = F.one_hot(indices1_s, num_classes=num_experts)
    if used_token is not None:
        mask1 = einsum("s,se->se", used_token, mask1)
    exp_counts = torch.sum(mask1, dim=0).detach().to(logits.device)
    if not drop_tokens:
        new_capacity = _max_over_group(torch.max(exp_counts).to(logits.device), ep_group)
        capacity = torch.minimum(
            new_capacity, torch.tensor(mask1.size(0), device=new_capacity.device)
        )
    me = torch.mean(gates, dim=0)
    ce = torch.mean(mask1.float(), dim=0)
    l_aux = torch.sum(me * ce) * num_experts
    mask1_rand = mask1 * torch.rand(mask1.shape, device=logits.device) if use_rts else mask1
    if logits.shape[0] < min_capacity:
        raise ValueError(
            f"top1gating: {logits.shape[0]} tokens < min_capacity={min_capacity}; set "
            "min_capacity=0 or route more tokens at once"
        )
    selection_capacity = int(min(int(capacity), mask1.size(0)))
    top_idx = torch.topk(mask1_rand, k=selection_capacity, dim=0)[1]
    mask1 = mask1 * torch.zeros_like(mask1).scatter_(0, top_idx, 1)
    locations1 = torch.cumsum(mask1, dim=0) - 1
    if sparse_routes:
        indices_mask = mask1.sum(dim=1) * num_experts - 1
        indices1_s = torch.min(indices1_s, indices_mask)
        gates1_s = (gates * mask1).sum(dim=1)
        locations1_s = torch.sum(locations1 * mask1, dim=1)
        return (l_aux, capacity, num_experts, indices1_s.to(torch.int32).unsqueeze(0),
                locations1_s.to(torch.int32).unsqueeze(0), gates1_s.unsqueeze(0), exp_counts)  # fmt: skip
    locations1_s = torch.sum(locations1 * mask1, dim=1)
    gates = gates * mask1.float()
    locations1_sc = F.one_hot(locations1_s, num_classes=int(capacity)).float()
    combine_weights = einsum("se,sc->sec", gates, locations1_sc)
    return l_aux, combine_weights, combine_weights.bool(), exp_counts


def top2gating(
    logits: Tensor,
    capacity_factor: float,
    min_capacity: int,
    drop_tokens: bool = True,
    ep_group: dist.ProcessGroup | None = None,
    top2_2nd_expert_sampling: bool = True,
    sparse_routes: bool = False,
) -> tuple:
    """Top-2 gating (GShard): 2nd expert sampled with Gumbel noise when asked; weights are the
    two kept gates renormalised (after capacity drops, as DeepSpeed does)."""
    gates = F.softmax(logits, dim=1)
    indices1_s = torch.argmax(gates, dim=1)
    num_experts = int(gates.shape[1])
    mask1 = F.one_hot(indices1_s, num_classes=num_experts)
    if top2_2nd_expert_sampling:
        logits = logits + gumbel_rsample(logits.shape, device=logits.device)
    logits_except1 = logits.masked_fill(mask1.bool(), float("-inf"))
    indices2_s = torch.argmax(logits_except1, dim=1)
    mask2 = F.one_hot(indices2_s, num_classes=num_experts)
    locations1 = torch.cumsum(mask1, dim=0) - 1
    locations2 = torch.cumsum(mask2, dim=0) - 1 + torch.sum(mask1, dim=0, keepdim=True)
    me = torch.mean(gates, dim=0)
    ce = torch.mean(mask1.float(), dim=0)
    l_aux = torch.mean(me * ce) * num_experts * num_experts
    exp_counts = torch.sum(mask1 + mask2, dim=0).detach().to(logits.device)
    if drop_tokens:
        capacity = _capacity(gates, torch.tensor(capacity_factor * 2), torch.tensor(min_capacity))
        mask1 = mask1 * torch.lt(locations1, capacity)
        mask2 = mask2 * torch.lt(locations2, capacity)
    else:
        capacity = _max_over_group(torch.max(exp_counts), ep_group)
    locations1_s = torch.sum(locations1 * mask1, dim=1)
    locations2_s = torch.sum(locations2 * mask2, dim=1)
    mask1_float, mask2_float = mask1.float(), mask2.float()
    gates1_s = einsum("se,se->s", gates, mask1_float)
    gates2_s = einsum("se,se->s", gates, mask2_float)
    denom_s = torch.clamp(gates1_s + gates2_s, min=torch.finfo(gates1_s.dtype).eps)
    gates1_s = gates1_s / denom_s
    gates2_s = gates2_s / denom_s
    if sparse_routes:
        indices1_s = torch.where(mask1.any(dim=1), indices1_s, torch.full_like(indices1_s, -1))
        indices2_s = torch.where(mask2.any(dim=1), indices2_s, torch.full_like(indices2_s, -1))
        return (l_aux, capacity, num_experts, torch.stack([indices1_s, indices2_s]).to(torch.int32),
                torch.stack([locations1_s, locations2_s]).to(torch.int32),
                torch.stack([gates1_s, gates2_s]), exp_counts)  # fmt: skip
    gates1 = einsum("s,se->se", gates1_s, mask1_float)
    gates2 = einsum("s,se->se", gates2_s, mask2_float)
    locations1_sc = F.one_hot(locations1_s, num_classes=int(capacity)).float()
    locations2_sc = F.one_hot(locations2_s, num_classes=int(capacity)).float()
    combine_weights = einsum("se,sc->sec", gates1, locations1_sc) + einsum(
        "se,sc->sec", gates2, locations2_sc
    )
    return l_aux, combine_weights, combine_weights.bool(), exp_counts


def topkgating(
    logits: Tensor,
    k: int,
    capacity_factor: float,
    min_capacity: int,
    drop_tokens: bool = True,
    ep_group: dist.ProcessGroup | None = None,
    drop_policy: str = "probs",
    sparse_routes: bool = False,
) -> tuple:
    """Top-k gating; ``drop_policy`` "probs" keeps each expert's highest-gate tokens, "position"
    the first ones."""
    gates = F.softmax(logits, dim=1)
    num_experts = int(gates.shape[1])
    top_gate, top_idx = torch.topk(gates, k=k, dim=1)
    mask = torch.zeros_like(gates, dtype=torch.bool).scatter_(1, top_idx, 1)
    exp_counts = torch.sum(mask, dim=0).detach().to(logits.device)
    me = torch.mean(gates, dim=0)
    ce = torch.mean(mask.float(), dim=0)
    l_aux = torch.mean(me * ce) * num_experts * num_experts / k
    if drop_tokens:
        capacity = _capacity(gates, torch.tensor(capacity_factor * k), torch.tensor(min_capacity))
        if drop_policy == "probs":
            topk_masked_gates = torch.zeros_like(gates).scatter(1, top_idx, top_gate)
            selection_capacity = int(min(int(capacity), gates.size(0)))
            _, capacity_indices = torch.topk(
                topk_masked_gates, k=selection_capacity, dim=0, sorted=False
            )
            capacity_mask = torch.zeros_like(gates, dtype=torch.bool).scatter_(
                0, capacity_indices, True
            )
            mask &= capacity_mask
            locations = torch.cumsum(mask, dim=0) - 1
        elif drop_policy == "position":
            locations = torch.cumsum(mask, dim=0) - 1
            mask *= torch.lt(locations, capacity)
        else:
            raise ValueError(f"Invalid drop_policy: {drop_policy!r}; use 'probs' or 'position'")
    else:
        capacity = _max_over_group(torch.max(exp_counts), ep_group)
        locations = torch.cumsum(mask, dim=0) - 1
    gates_masked = gates * mask
    denom_s = torch.clamp(
        gates_masked.sum(dim=-1, keepdim=True), min=torch.finfo(gates_masked.dtype).eps
    )
    gates_masked = gates_masked / denom_s
    if sparse_routes:
        route_kept = mask.gather(1, top_idx)
        route_indices = torch.where(route_kept, top_idx, torch.full_like(top_idx, -1))
        route_locations = locations.gather(1, top_idx) * route_kept
        route_gates = gates_masked.gather(1, top_idx)
        return (l_aux, capacity, num_experts, route_indices.t().contiguous().to(torch.int32),
                route_locations.t().contiguous().to(torch.int32), route_gates.t().contiguous(),
                exp_counts)  # fmt: skip
    locations_sc = F.one_hot(locations * mask, num_classes=int(capacity)).float()
    combine_weights = torch.einsum("se,sec->sec", gates_masked, locations_sc)
    return l_aux, combine_weights, combine_weights.bool(), exp_counts


class Experts(nn.Module):
    """DeepSpeed's ``Experts``: ``num_local_experts`` deep copies of ``expert`` in
    ``deepspeed_experts``, their parameters marked ``allreduce = False`` and
    ``group_name = expert_group_name``; ``forward`` splits [G, E*C, M]-style input into one
    chunk per expert along dim 1 and concatenates the outputs (a tuple's first item)."""

    def __init__(
        self, expert: nn.Module, num_local_experts: int = 1, expert_group_name: str | None = None
    ) -> None:
        super().__init__()
        self.deepspeed_experts = nn.ModuleList(
            [copy.deepcopy(expert) for _ in range(num_local_experts)]
        )
        self.num_local_experts = num_local_experts
        for e in self.deepspeed_experts:
            for param in e.parameters():
                param.allreduce = False
                param.group_name = expert_group_name

    def forward(self, inputs: Tensor) -> Tensor:
        chunks = inputs.chunk(self.num_local_experts, dim=1)
        outs = []
        for chunk, expert in zip(chunks, self.deepspeed_experts):
            out = expert(chunk)
            outs.append(out[0] if isinstance(out, tuple) else out)
        return torch.cat(outs, dim=1)
