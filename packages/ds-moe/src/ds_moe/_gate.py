"""The router module: a bias-free linear layer in fp32 plus the routing policy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ds_moe._config import GateConfig, NoisyGatePolicy
from ds_moe._gate_linear import fused_gate_available, fused_gate_requested, gate_logits
from ds_moe._gating import multiplicative_jitter
from ds_moe._route_fused import fused_route_available, fused_route_requested
from ds_moe._routing import Routing, capacity, gumbel_like, route

#: Switch Transformer's multiplicative jitter half-width
JITTER_EPS = 1e-2


class TopKGate(nn.Module):
    """Chooses k experts per token and how many tokens each expert may take.

    The logits are computed in fp32 whatever the parameter dtype (as DeepSpeed does), because
    softmax over bf16 logits makes near-ties between experts flip from step to step. The
    weight itself stays in the model's dtype so ZeRO sees an ordinary parameter.
    """

    wg: nn.Linear
    config: GateConfig
    #: the logits from the tokens' own dtype without an fp32 copy (``_gate_linear``): None
    #: follows ``DS_MOE_FUSED_GATE``, True/False override it
    fuse_logits: bool | None = None
    #: the capacity and placement in three kernels (``_route_fused``): None follows
    #: ``DS_MOE_FUSED_ROUTE`` (default on where its probe passes), True/False override it
    fuse_route: bool | None = None

    def __init__(self, hidden_size: int, config: GateConfig) -> None:
        super().__init__()
        self.config = config
        self.wg = nn.Linear(hidden_size, config.num_experts, bias=False)

    def capacity_for(self, num_tokens: int) -> int | None:
        """Slots per expert for ``num_tokens`` local tokens, or None when dropless."""
        cfg = self.config
        if not cfg.drop_tokens:
            return None
        factor = cfg.capacity_factor if self.training else cfg.eval_capacity_factor
        return capacity(num_tokens, cfg.num_experts, cfg.k, factor, cfg.min_capacity)

    def _logits(self, x: torch.Tensor, *, jitter: bool) -> torch.Tensor:
        """fp32 ``x @ wg.T``: fused where asked for and its kernels run, else on fp32 copies."""
        w = self.wg.weight
        if (
            not jitter
            and x.dtype == w.dtype
            and x.dim() == 2
            and fused_gate_requested(self.fuse_logits)
            and fused_gate_available(x.device, x.dtype)
        ):
            return gate_logits(x, w)
        inp = x.float()
        if jitter:
            inp = multiplicative_jitter(inp, inp.device, JITTER_EPS)
        return F.linear(inp, w.float())

    def forward(self, x: torch.Tensor, used_token: torch.Tensor | None = None) -> Routing:
        """Route ``x`` [S, hidden] (already flattened)."""
        cfg = self.config
        noisy = self.training and cfg.noisy_gate_policy
        logits = self._logits(x, jitter=noisy is NoisyGatePolicy.JITTER)
        selection = None
        sample_2nd = self.training and cfg.k == 2 and cfg.top2_2nd_expert_sampling
        if noisy is NoisyGatePolicy.RSAMPLE or sample_2nd:
            selection = logits.detach() + gumbel_like(logits)
        if sample_2nd:
            # DeepSpeed's top2gating: 1st expert = argmax of the clean logits, 2nd = argmax of
            # logits + Gumbel noise over the others (Gumbel-max sampling from the softmax);
            # as there, the one noise draw serves RSample too for k = 2.
            first = logits.detach().argmax(dim=-1, keepdim=True)
            selection = selection.scatter(1, first, float("inf"))
        priority = None
        if self.training and cfg.use_rts:
            # Random Token Selection: which tokens lose their slot is random, not "the last
            # ones in the batch", so late positions of a sequence are not always dropped.
            priority = torch.randperm(x.shape[0], device=x.device)
        return route(
            logits,
            cfg.k,
            capacity_slots=self.capacity_for(x.shape[0]),
            selection_logits=selection,
            token_priority=priority,
            used_token=used_token,
            router_z_loss_coef=cfg.router_z_loss_coef,
            fused=used_token is None
            and fused_route_requested(self.fuse_route)
            and fused_route_available(x.device),
        )
