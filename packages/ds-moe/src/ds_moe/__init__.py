"""Mixture-of-experts layer with top-k gating and expert parallelism."""

from ds_moe._config import GateConfig, NoisyGatePolicy
from ds_moe._experts import GroupedMLPExperts, LoopExperts
from ds_moe._gate import TopKGate
from ds_moe._gating import (
    Experts,
    einsum,
    gumbel_rsample,
    multiplicative_jitter,
    top1gating,
    top2gating,
    topkgating,
)
from ds_moe._grad_reduce import reduce_gradients
from ds_moe._grouped_gemm import grouped_mm_available
from ds_moe._groups import (
    ExpertGroups,
    create_expert_groups,
    get_expert_data_parallel_group,
    get_expert_data_parallel_rank,
    get_expert_data_parallel_world_size,
    get_expert_parallel_group,
    get_expert_parallel_group_dict,
    get_expert_parallel_rank,
    get_expert_parallel_world_size,
)
from ds_moe._layer import MoE
from ds_moe._params import (
    configure_moe_param_groups,
    has_moe_layers,
    is_moe_param,
    is_moe_param_group,
    split_params_grads_into_shared_and_expert_params,
    split_params_into_different_moe_groups_for_optimizer,
    split_params_into_shared_and_expert_params,
)
from ds_moe._pyramid import pyramid_moe_layers
from ds_moe._routing import Routing, capacity, load_balancing_loss, route, router_z_loss
from ds_moe._version import __version__

__all__ = [
    "ExpertGroups",
    "Experts",
    "GateConfig",
    "GroupedMLPExperts",
    "LoopExperts",
    "MoE",
    "NoisyGatePolicy",
    "Routing",
    "TopKGate",
    "__version__",
    "capacity",
    "configure_moe_param_groups",
    "create_expert_groups",
    "einsum",
    "get_expert_data_parallel_group",
    "get_expert_data_parallel_rank",
    "get_expert_data_parallel_world_size",
    "get_expert_parallel_group",
    "get_expert_parallel_group_dict",
    "get_expert_parallel_rank",
    "get_expert_parallel_world_size",
    "grouped_mm_available",
    "gumbel_rsample",
    "has_moe_layers",
    "is_moe_param",
    "is_moe_param_group",
    "load_balancing_loss",
    "multiplicative_jitter",
    "pyramid_moe_layers",
    "reduce_gradients",
    "route",
    "router_z_loss",
    "split_params_grads_into_shared_and_expert_params",
    "split_params_into_different_moe_groups_for_optimizer",
    "split_params_into_shared_and_expert_params",
    "top1gating",
    "top2gating",
    "topkgating",
]
