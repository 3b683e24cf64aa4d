"""``deepspeed.moe.*`` (ds-all's ``ds_all.moe``): DeepSpeed 0.19.8's MoE module paths, names and
parameter lists, and a model with an MoE layer through its utils, in one process."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch
from torch import nn

#: DeepSpeed 0.19.8's parameter names (``inspect.signature`` under its own interpreter)
_DEEPSPEED_0198 = {
    ("layer", "MoE"): [
        "hidden_size", "expert", "num_experts", "ep_size", "k", "capacity_factor",
        "eval_capacity_factor", "min_capacity", "use_residual", "noisy_gate_policy",
        "drop_tokens", "use_rts", "use_tutel", "enable_expert_tensor_parallelism",
        "top2_2nd_expert_sampling",
    ],
    ("layer", "MoE.forward"): ["self", "hidden_states", "used_token"],
    ("layer", "MoE.set_deepspeed_parallelism"): ["self", "use_data_before_expert_parallel_"],
    ("experts", "Experts"): ["expert", "num_local_experts", "expert_group_name"],
    ("sharded_moe", "top1gating"): [
        "logits", "capacity_factor", "min_capacity", "used_token", "noisy_gate_policy",
        "drop_tokens", "use_rts", "ep_group", "sparse_routes", "use_tutel",
    ],
    ("sharded_moe", "top2gating"): [
        "logits", "capacity_factor", "min_capacity", "drop_tokens", "ep_group",
        "top2_2nd_expert_sampling", "sparse_routes",
    ],
    ("sharded_moe", "topkgating"): [
        "logits", "k", "capacity_factor", "min_capacity", "drop_tokens", "ep_group",
        "drop_policy", "sparse_routes",
    ],
    ("sharded_moe", "gumbel_rsample"): ["shape", "device"],
    ("sharded_moe", "multiplicative_jitter"): ["x", "device", "epsilon"],
    ("sharded_moe", "einsum"): ["rule", "a", "b"],
    ("utils", "is_moe_param"): ["param"],
    ("utils", "split_params_into_shared_and_expert_params"): ["params"],
    ("utils", "split_params_grads_into_shared_and_expert_params"): ["group"],
    ("utils", "split_params_into_different_moe_groups_for_optimizer"): [
        "param_groups", "max_group_size",
    ],
    ("utils", "has_moe_layers"): ["m"],
    ("utils", "is_moe_param_group"): ["param_group"],
    ("utils", "configure_moe_param_groups"): ["model_parameters"],
    ("mappings", "gather_tokens"): ["input_", "dim"],
    ("mappings", "drop_tokens"): ["input_", "dim"],
}  # fmt: skip


@pytest.mark.parametrize("where", sorted(_DEEPSPEED_0198), ids=lambda w: ".".join(w))
def test_deepspeed_moe_names_and_parameters(where):
    module, name = where
    obj = importlib.import_module(f"ds_all.moe.{module}")
    for part in name.split("."):
        obj = getattr(obj, part)
    names = list(inspect.signature(obj).parameters)
    assert names[: len(_DEEPSPEED_0198[where])] == _DEEPSPEED_0198[where]
    extra = inspect.signature(obj).parameters
    for p in names[len(_DEEPSPEED_0198[where]) :]:
        assert extra[p].kind is inspect.Parameter.KEYWORD_ONLY, p  # ours: keyword-only extras


def test_defaults_match_deepspeed():
    from ds_all.moe.layer import MoE
    from ds_all.moe.utils import split_params_into_different_moe_groups_for_optimizer

    params = inspect.signature(MoE.__init__).parameters
    assert params["use_tutel"].default is False
    assert params["enable_expert_tensor_parallelism"].default is False
    assert params["top2_2nd_expert_sampling"].default is True
    assert params["min_capacity"].default == 4
    split = inspect.signature(split_params_into_different_moe_groups_for_optimizer).parameters
    assert split["max_group_size"].default == 178956971


def test_same_objects_as_ds_moe():
    import ds_all.moe
    import ds_moe
    from ds_all.moe import experts, layer, sharded_moe, utils

    assert ds_all.moe.MoE is layer.MoE is ds_moe.MoE
    assert experts.Experts is ds_moe.Experts
    assert sharded_moe.top2gating is ds_moe.top2gating
    assert utils.is_moe_param is ds_moe.is_moe_param


def test_model_with_moe_layer_through_deepspeed_paths():
    from ds_all.moe.layer import MoE
    from ds_all.moe.mappings import drop_tokens, gather_tokens
    from ds_all.moe.utils import (
        configure_moe_param_groups,
        has_moe_layers,
        split_params_into_shared_and_expert_params,
    )

    torch.manual_seed(0)
    expert = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    model = nn.Sequential(nn.Linear(8, 8), MoE(8, expert, num_experts=4, k=2))
    model[1].set_deepspeed_parallelism()
    out, l_aux, exp_counts = model[1](model[0](torch.randn(2, 5, 8)))
    assert out.shape == (2, 5, 8) and l_aux.dim() == 0 and int(exp_counts.sum()) == 20
    assert has_moe_layers(model) == (True, 4)
    shared, experts = split_params_into_shared_and_expert_params(list(model.parameters()))
    assert len(experts) == 4  # stacked w1, b1, w2, b2
    groups = configure_moe_param_groups(list(model.parameters()))
    assert [g.get("moe", False) for g in groups] == [False, True]
    torch.optim.AdamW(groups, lr=1e-3)
    x = torch.randn(3, 8)
    assert gather_tokens(x) is x and drop_tokens(x, dim=1) is x
    with pytest.raises(ValueError, match="use_tutel=True"):
        MoE(8, expert, num_experts=4, use_tutel=True)
