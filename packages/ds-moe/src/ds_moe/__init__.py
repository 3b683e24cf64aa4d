"""Mixture-of-experts layer with top-k gating and expert parallelism."""

from ds_moe._config import GateConfig, NoisyGatePolicy
from ds_moe._experts import GroupedMLPExperts, LoopExperts
from ds_moe._gate import TopKGate
from ds_moe._grad_reduce import reduce_gradients
from ds_moe._grouped_gemm import grouped_mm_available
from ds_moe._groups import (
    ExpertGroups,
    create_expert_groups,
    get_expert_data_parallel_group,
    get_expert_parallel_group,
)
from ds_moe._layer import MoE
from ds_moe._params import is_moe_param, split_params_into_different_moe_groups_for_optimizer
from ds_moe._pyramid import pyramid_moe_layers
from ds_moe._routing import Routing, capacity, load_balancing_loss, route, router_z_loss
from ds_moe._version import __version__

__all__ = [
    "ExpertGroups",
    "GateConfig",
    "GroupedMLPExperts",
    "LoopExperts",
    "MoE",
    "NoisyGatePolicy",
    "Routing",
    "TopKGate",
    "__version__",
    "capacity",
    "create_expert_groups",
    "get_expert_data_parallel_group",
    "get_expert_parallel_group",
    "grouped_mm_available",
    "is_moe_param",
    "load_balancing_loss",
    "pyramid_moe_layers",
    "reduce_gradients",
    "route",
    "router_z_loss",
    "split_params_into_different_moe_groups_for_optimizer",
]
