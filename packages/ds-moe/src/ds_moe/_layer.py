"""``MoE``: router + local experts + dispatch, optionally with a dense residual branch."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import ds_comm
from ds_moe._combine import fused_combine_available, fused_combine_requested
from ds_moe._config import GateConfig, NoisyGatePolicy, check_ep_size
from ds_moe._dispatch import dispatch_and_combine, make_plan
from ds_moe._experts import GroupedMLPExperts, LoopExperts, build_local_experts, mlp_parts
from ds_moe._gate import TopKGate
from ds_moe._gating import refuse_tutel
from ds_moe._groups import ExpertGroups, create_expert_groups
from ds_moe._local_dispatch import combine, local_layout, permute
from ds_moe._params import mark_expert_params


class MoE(nn.Module):
    """A mixture-of-experts layer: ``forward(x) -> (output, l_aux, exp_counts)``.

    Args mirror DeepSpeed's ``deepspeed.moe.layer.MoE``:

    - ``expert``: the module every expert starts as a copy of; a
      ``Sequential(Linear, activation, Linear)`` runs as stacked weights with grouped GEMMs.
    - ``num_experts`` experts in total, split over ``ep_size`` ranks (expert parallelism; the
      tokens travel by all-to-all; ``ep_size`` must divide both ``num_experts`` and the world).
    - ``k`` experts per token; ``capacity_factor`` / ``eval_capacity_factor`` /
      ``min_capacity`` size each expert's slots; ``drop_tokens=False`` is dropless routing.
    - ``noisy_gate_policy`` None, ``"Jitter"`` or ``"RSample"``; ``use_rts`` random token
      selection for capacity while training; ``router_z_loss_coef`` adds the ST-MoE z-loss to
      ``l_aux``.
    - ``use_residual``: Residual MoE (PR-MoE): a dense copy of ``expert`` runs on every token
      and a learned 2-way softmax mixes it with the MoE output.
    - ``grouped_experts`` None (auto) / True / False: stack MLP experts or loop over copies.

    ``output`` has the input's shape; a token whose every choice was dropped gets zeros (it
    passes through the surrounding residual connection), or only the residual branch's
    contribution with ``use_residual``. ``l_aux`` is this rank's load-balancing loss (plus
    z-loss); ``exp_counts`` is an int64 tensor on the input's device of tokens per expert
    before capacity (DeepSpeed returns it on the CPU; ``.cpu()`` it where needed).
    """

    hidden_size: int
    num_experts: int
    ep_size: int
    num_local_experts: int
    k: int
    expert_group_name: str
    #: global ids of the experts this rank holds, in local order
    expert_ids: tuple[int, ...]
    gate: TopKGate
    experts: GroupedMLPExperts | LoopExperts
    use_residual: bool
    mlp: nn.Module | None
    coefficient: nn.Linear | None
    #: the single-pass combine and permutation backward (``_combine``) on one rank: None
    #: follows ``DS_MOE_FUSED_COMBINE`` (default on), True/False override it
    fuse_combine: bool | None = None

    def __init__(
        self,
        hidden_size: int,
        expert: nn.Module,
        num_experts: int = 1,
        ep_size: int = 1,
        k: int = 1,
        capacity_factor: float = 1.0,
        eval_capacity_factor: float = 1.0,
        min_capacity: int = 4,
        use_residual: bool = False,
        noisy_gate_policy: str | NoisyGatePolicy | None = None,
        drop_tokens: bool = True,
        use_rts: bool = True,
        use_tutel: bool = False,
        enable_expert_tensor_parallelism: bool = False,
        top2_2nd_expert_sampling: bool = True,
        *,
        router_z_loss_coef: float = 0.0,
        grouped_experts: bool | None = None,
    ) -> None:
        super().__init__()
        refuse_tutel(use_tutel)
        if enable_expert_tensor_parallelism:
            raise ValueError(
                "enable_expert_tensor_parallelism=True: ds-moe does not split experts over "
                "tensor-parallel ranks (no mpu support); pass enable_expert_tensor_parallelism="
                "False and use ep_size for expert parallelism"
            )
        # Without a process group every rank would hold all experts and train alone.
        ds_comm.require_initialized_if_launched("ds_moe.MoE")
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size={hidden_size!r} must be a positive int")
        if not isinstance(expert, nn.Module):
            raise TypeError(f"expert must be an nn.Module, got {type(expert).__name__}")
        parts = mlp_parts(expert)
        if parts is not None and (
            parts[0].in_features != hidden_size or parts[2].out_features != hidden_size
        ):
            raise ValueError(
                f"expert maps {parts[0].in_features} -> {parts[2].out_features} features but "
                f"hidden_size={hidden_size}; an expert must map hidden_size -> hidden_size"
            )
        config = GateConfig(
            num_experts=num_experts,
            k=k,
            capacity_factor=capacity_factor,
            eval_capacity_factor=eval_capacity_factor,
            min_capacity=min_capacity,
            drop_tokens=drop_tokens,
            noisy_gate_policy=NoisyGatePolicy.parse(noisy_gate_policy),
            use_rts=use_rts,
            router_z_loss_coef=router_z_loss_coef,
            top2_2nd_expert_sampling=bool(top2_2nd_expert_sampling),
        )
        check_ep_size(num_experts, ep_size)
        groups: ExpertGroups = create_expert_groups(ep_size)
        self._groups = groups
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.num_local_experts = num_experts // ep_size
        self.k = k
        self.expert_group_name = groups.name
        first = groups.ep_rank * self.num_local_experts
        self.expert_ids = tuple(range(first, first + self.num_local_experts))

        self.gate = TopKGate(hidden_size, config)
        self.experts = build_local_experts(expert, self.num_local_experts, grouped_experts)
        mark_expert_params(self.experts, groups)

        self.enable_expert_tensor_parallelism = False
        self.use_residual = use_residual
        self.mlp = copy.deepcopy(expert) if use_residual else None
        self.coefficient = nn.Linear(hidden_size, 2) if use_residual else None

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """DeepSpeed's hook (its engine calls it on every MoE layer): make sure this layer's
        expert groups exist. ds-moe builds them in ``__init__`` already, so this only checks
        they are still those of the current world (re-creating them after a re-init)."""
        self._create_process_groups(
            use_data_before_expert_parallel_=use_data_before_expert_parallel_
        )

    def _create_process_groups(self, use_data_before_expert_parallel_: bool = False) -> None:
        if use_data_before_expert_parallel_:
            raise ValueError(
                "use_data_before_expert_parallel_=True: ds-moe's expert-parallel groups are "
                "consecutive ranks (expert parallelism before data parallelism); pass False"
            )
        groups = create_expert_groups(self.ep_size)
        if groups is not self._groups:
            self._groups = groups
            mark_expert_params(self.experts, groups)

    @property
    def ep_group(self):
        """The expert-parallel ProcessGroup (None for ep_size 1)."""
        return self._groups.ep_group

    @property
    def expert_dp_group(self):
        """The ProcessGroup the experts' gradients are reduced over (None without dist)."""
        return self._groups.expert_dp_group

    def forward(
        self, hidden_states: torch.Tensor, used_token: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"MoE input has last dimension {hidden_states.shape[-1]} but hidden_size="
                f"{self.hidden_size}; pass [..., {self.hidden_size}]"
            )
        x = hidden_states.reshape(-1, self.hidden_size)
        routing = self.gate(x, used_token)
        if self.ep_size == 1:
            # Own experts only: static sizes, device-side group ends, no host sync.
            layout = local_layout(routing)
            fused = fused_combine_requested(self.fuse_combine) and fused_combine_available(
                x.device, x.dtype
            )
            y = self.experts(permute(x, layout, fused=fused), offs=layout.offs)
            out = combine(y, routing, layout, fused=fused and y.dtype == x.dtype)
        else:
            # The all-to-all needs its split sizes on the host: one copy of the counts.
            plan = make_plan(
                routing,
                self.ep_size,
                self.ep_group,
                self.num_local_experts,
                self.experts.row_alignment(x),
            )
            out = dispatch_and_combine(x, routing, plan, self.experts, self.ep_group)
        out = out.view(hidden_states.shape)
        if self.use_residual:
            assert self.mlp is not None and self.coefficient is not None
            mixed = F.softmax(self.coefficient(hidden_states), dim=-1)
            dense = self.mlp(hidden_states)
            if isinstance(dense, tuple):
                dense = dense[0]  # an (output, bias) expert: DeepSpeed ignores the bias too
            out = out * mixed[..., 0:1] + dense * mixed[..., 1:2]
        # On the input's device: a CPU copy (DeepSpeed's) would cost a host sync per forward.
        return out, routing.l_aux, routing.exp_counts
