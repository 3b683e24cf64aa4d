"""DeepSpeed 0.19.8's MoE API on ds-moe: MoE's constructor and hooks, the gating functions
(checked against outputs DeepSpeed 0.19.8 itself produced, ``deepspeed_gating_0198.json``),
``Experts`` and the parameter / optimizer-group helpers of ``deepspeed.moe.utils``."""

from __future__ import annotations

import inspect
import json
import pathlib

import pytest
import torch
from torch import nn

import ds_moe

D = 8
_DS = json.loads((pathlib.Path(__file__).parent / "deepspeed_gating_0198.json").read_text())


def _mlp():
    return nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, D))


def test_moe_constructor_takes_deepspeeds_parameters_positionally():
    names = list(inspect.signature(ds_moe.MoE.__init__).parameters)[1:16]
    assert names == [
        "hidden_size", "expert", "num_experts", "ep_size", "k", "capacity_factor",
        "eval_capacity_factor", "min_capacity", "use_residual", "noisy_gate_policy",
        "drop_tokens", "use_rts", "use_tutel", "enable_expert_tensor_parallelism",
        "top2_2nd_expert_sampling",
    ]  # fmt: skip
    moe = ds_moe.MoE(D, _mlp(), 4, 1, 2, 1.0, 1.0, 4, False, None, True, True, False, False, False)
    assert moe.gate.config.top2_2nd_expert_sampling is False
    assert moe.enable_expert_tensor_parallelism is False
    assert ds_moe.MoE(D, _mlp(), 4, k=2).gate.config.top2_2nd_expert_sampling is True


@pytest.mark.parametrize(
    "kw", [dict(use_tutel=True), dict(enable_expert_tensor_parallelism=True)], ids=str
)
def test_unsupported_features_are_refused_by_name(kw):
    (name,) = kw
    with pytest.raises(ValueError, match=f"{name}=True.*pass {name}=False"):
        ds_moe.MoE(D, _mlp(), 4, **kw)


def test_top2_second_expert_is_sampled_while_training_only():
    torch.manual_seed(0)
    moe = ds_moe.MoE(D, _mlp(), 8, k=2, drop_tokens=False, use_rts=False)
    x = torch.randn(512, D)
    logits = x @ moe.gate.wg.weight.t()
    top2 = logits.topk(2, dim=-1).indices
    moe.train()
    r = moe.gate(x)
    assert torch.equal(r.expert_index[:, 0], top2[:, 0])  # the 1st expert is never sampled
    assert (r.expert_index[:, 1] != top2[:, 1]).any()  # the 2nd is
    assert (r.expert_index[:, 1] != r.expert_index[:, 0]).all()
    moe.eval()
    assert torch.equal(moe.gate(x).expert_index, top2)
    moe.gate.config = ds_moe.GateConfig(num_experts=8, k=2, top2_2nd_expert_sampling=False)
    moe.train()
    assert torch.equal(moe.gate(x).expert_index, top2)


def test_set_deepspeed_parallelism():
    moe = ds_moe.MoE(D, _mlp(), 4)
    moe.set_deepspeed_parallelism()
    moe._create_process_groups(use_data_before_expert_parallel_=False)
    assert moe.expert_group_name == "ep_size_1"
    assert all(p.group_name == "ep_size_1" for p in moe.experts.parameters())
    with pytest.raises(ValueError, match="use_data_before_expert_parallel_"):
        moe.set_deepspeed_parallelism(use_data_before_expert_parallel_=True)


class _WithBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x):
        return self.fc(x), self.fc.bias


def test_residual_expert_returning_a_tuple():
    moe = ds_moe.MoE(D, _WithBias(), 2, use_residual=True)
    out, _, _ = moe(torch.randn(3, 5, D))
    assert out.shape == (3, 5, D)


def _gate_call(case, logits):
    fn = getattr(ds_moe, case["fn"])
    return fn(logits.clone(), **case["kw"]), fn(logits.clone(), **case["kw"], sparse_routes=True)


@pytest.mark.parametrize("name", [k for k in _DS if k != "logits"])
def test_gating_functions_match_deepspeed(name):
    case = _DS[name]
    logits = torch.tensor(_DS["logits"])
    (l_aux, combine, dispatch, counts), sparse = _gate_call(case, logits)
    torch.testing.assert_close(float(l_aux), case["l_aux"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(combine, torch.tensor(case["combine"]), rtol=1e-6, atol=1e-6)
    assert dispatch.tolist() == case["dispatch"]
    assert counts.tolist() == case["exp_counts"]
    s = case["sparse"]
    _, cap, e, idx, loc, gates, counts = sparse
    assert (int(cap), e, idx.tolist(), loc.tolist()) == (
        s["capacity"], s["E"], s["indices"], s["locations"],
    )  # fmt: skip
    torch.testing.assert_close(gates, torch.tensor(s["gates"]), rtol=1e-6, atol=1e-6)


def test_gating_helpers():
    torch.manual_seed(0)
    g = ds_moe.gumbel_rsample((1000,), device=torch.device("cpu"))
    assert g.shape == (1000,) and abs(g.mean().item() - 0.5772) < 0.1  # Euler-Mascheroni
    x = torch.ones(100)
    j = ds_moe.multiplicative_jitter(x, device=x.device, epsilon=0.1)
    assert ((j >= 0.9) & (j <= 1.1)).all() and not torch.equal(j, x)
    assert ds_moe.multiplicative_jitter(x, device=x.device, epsilon=0) is x
    a, b = torch.randn(3, 4), torch.randn(3, 5)
    torch.testing.assert_close(ds_moe.einsum("se,sc->sec", a, b), a[:, :, None] * b[:, None])
    with pytest.raises(ValueError, match="use_tutel"):
        ds_moe.top1gating(torch.randn(8, 2), 1.0, 1, use_tutel=True)


def test_experts_container():
    experts = ds_moe.Experts(nn.Linear(D, D), num_local_experts=2, expert_group_name="ep_size_1")
    assert len(experts.deepspeed_experts) == 2
    for p in experts.parameters():
        assert p.allreduce is False and p.group_name == "ep_size_1"
        assert ds_moe.is_moe_param(p)  # DeepSpeed's marks count as expert parameters
    x = torch.randn(1, 6, D)
    y = experts(x)
    e0, e1 = experts.deepspeed_experts
    torch.testing.assert_close(y, torch.cat([e0(x[:, :3]), e1(x[:, 3:])], dim=1))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, D), ds_moe.MoE(D, _mlp(), 4))


def test_shared_and_expert_split():
    model = _model()
    params = list(model.parameters())
    shared, expert = ds_moe.split_params_into_shared_and_expert_params(params)
    assert {id(p) for p in expert} == {id(p) for p in model[1].experts.parameters()}
    assert len(shared) + len(expert) == len(params)
    out, l_aux, _ = model[1](model[0](torch.randn(16, D)))
    (out.sum() + l_aux).backward()
    sg, eg = ds_moe.split_params_grads_into_shared_and_expert_params(params)
    assert len(eg) == len(expert) and len(sg) == sum(p.grad is not None for p in shared)
    assert ds_moe.has_moe_layers(model) == (True, 4)
    assert ds_moe.has_moe_layers(nn.Linear(2, 2)) == (False, 0)


def test_moe_groups_max_group_size_and_configure():
    model = _model()
    n_expert = sum(p.numel() for p in model[1].experts.parameters())
    groups = ds_moe.split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "g", "lr": 0.1}
    )
    assert [ds_moe.is_moe_param_group(g) for g in groups] == [False, True]
    small = ds_moe.split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "g"}, max_group_size=n_expert // 2
    )
    moe_groups = [g for g in small if g.get("moe")]
    assert len(moe_groups) >= 2 and all(g["name"] == "ep_size_1" for g in moe_groups)
    assert sum(p.numel() for g in moe_groups for p in g["params"]) == n_expert
    for g in moe_groups:
        assert len(g["params"]) == 1 or sum(p.numel() for p in g["params"]) <= n_expert // 2
    configured = ds_moe.configure_moe_param_groups(list(model.parameters()))
    assert configured[0]["name"] == "dense-params" and configured[1]["moe"] is True
    assert ds_moe.configure_moe_param_groups(configured) is configured
    with pytest.raises(TypeError, match="Tensors or dicts"):
        ds_moe.configure_moe_param_groups([1])


def test_expert_group_getters_single_process():
    ds_moe.MoE(D, _mlp(), 2)
    assert "ep_size_1" in ds_moe.get_expert_parallel_group_dict()
    assert ds_moe.get_expert_parallel_world_size("ep_size_1") == 1
    assert ds_moe.get_expert_parallel_rank("ep_size_1") == 0
    assert ds_moe.get_expert_data_parallel_world_size("ep_size_1") == 1
    assert ds_moe.get_expert_data_parallel_rank("ep_size_1") == 0
