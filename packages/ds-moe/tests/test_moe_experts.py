"""Tier 1: grouped-GEMM experts against the loop, and the expert-parameter contract."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch import nn

import ds_moe
from ds_moe import _grouped_gemm


def _mlp(d=16, f=32):
    return nn.Sequential(nn.Linear(d, f), nn.ReLU(), nn.Linear(f, d))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_kernel_matches_loop_with_empty_groups(dtype):
    if not ds_moe.grouped_mm_available(torch.device("cpu"), dtype):
        pytest.skip(f"torch {torch.__version__} has no CPU _grouped_mm for {dtype}")
    torch.manual_seed(0)
    grouped = ds_moe.GroupedMLPExperts(_mlp(), 4).to(dtype)
    with torch.no_grad():
        for p in grouped.parameters():
            p.copy_(torch.randn_like(p))
    loop = ds_moe.GroupedMLPExperts(_mlp(), 4, use_grouped_mm=False).to(dtype)
    loop.load_state_dict(grouped.state_dict())
    sizes = [5, 0, 11, 3]
    x = torch.randn(sum(sizes), 16, dtype=dtype)
    g = torch.randn(sum(sizes), 16, dtype=dtype)
    outs, grads = [], []
    for m in (grouped, loop):
        xi = x.clone().requires_grad_()
        y = m(xi, sizes)
        y.backward(g)
        outs.append(y)
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[0], outs[1], **tol)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **tol)
    # the empty group's weights get an exactly-zero gradient
    assert torch.count_nonzero(grads[0][1][1]) == 0


def test_grouped_kernel_is_used_when_available():
    if not ds_moe.grouped_mm_available(torch.device("cpu"), torch.float32):
        pytest.skip("no CPU _grouped_mm in this torch")
    m = ds_moe.GroupedMLPExperts(_mlp(), 2)
    with mock.patch.object(torch, "_grouped_mm", wraps=torch._grouped_mm) as spy:
        m(torch.randn(6, 16), [2, 4])
    assert spy.call_count == 2


@pytest.mark.parametrize("bias", [True, False])
def test_expanded_gradient_reaches_the_grouped_kernel(bias):
    # y.sum().backward() hands the GEMM a zero-stride gradient, which _grouped_mm rejects
    if not ds_moe.grouped_mm_available(torch.device("cpu"), torch.float32):
        pytest.skip("no CPU _grouped_mm in this torch")
    mlp = nn.Sequential(nn.Linear(16, 32, bias=bias), nn.ReLU(), nn.Linear(32, 16, bias=bias))
    m = ds_moe.GroupedMLPExperts(mlp, 2)
    x = torch.randn(6, 16, requires_grad=True)
    m(x, [2, 4]).sum().backward()
    ref = ds_moe.GroupedMLPExperts(mlp, 2, use_grouped_mm=False)
    xr = x.detach().clone().requires_grad_()
    ref(xr, [2, 4]).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(m.w1.grad, ref.w1.grad)


def test_forced_grouped_mm_errors_when_unavailable():
    m = ds_moe.GroupedMLPExperts(_mlp(d=5, f=7), 2, use_grouped_mm=True)  # rows not 16-byte aligned
    with pytest.raises(RuntimeError, match="grouped GEMM was requested"):
        m(torch.randn(4, 5), [1, 3])


def test_probe_failure_means_loop():
    _grouped_gemm._probe.cache_clear()
    try:
        with mock.patch.object(torch, "_grouped_mm", side_effect=RuntimeError("no kernel")):
            assert not ds_moe.grouped_mm_available(torch.device("cpu"), torch.float32)
            m = ds_moe.GroupedMLPExperts(_mlp(), 2)
            y = m(torch.randn(6, 16), [2, 4])  # runs the loop
            assert y.shape == (6, 16)
    finally:
        _grouped_gemm._probe.cache_clear()


def test_group_bias_from_device_offsets_ignores_rows_after_the_last_group():
    if not ds_moe.grouped_mm_available(torch.device("cpu"), torch.float32):
        pytest.skip("no CPU _grouped_mm in this torch")
    y = torch.randn(9, 8)
    y[7:] = float("nan")  # rows past offs[-1]: undefined, as the grouped kernel leaves them
    y.requires_grad_()
    b = torch.randn(3, 8, requires_grad=True)
    offs = torch.tensor([2, 2, 7], dtype=torch.int32)
    onehot = _grouped_gemm.group_onehot(offs, 9, y.dtype)
    assert onehot.tolist() == [[1, 0, 0]] * 2 + [[0, 0, 1]] * 5 + [[0, 0, 0]] * 2
    out = _grouped_gemm._GroupBias.apply(y.clone(), b, offs, onehot)
    ref = y[:7] + torch.cat([b[0].expand(2, 8), b[2].expand(5, 8)])
    torch.testing.assert_close(out[:7], ref)
    g = torch.randn(9, 8)
    g[7:] = float("nan")  # and so are their gradients
    out.backward(g)
    torch.testing.assert_close(b.grad, torch.stack([g[:2].sum(0), torch.zeros(8), g[2:7].sum(0)]))


@pytest.mark.parametrize("grouped", [None, False])
def test_expert_params_are_marked_and_others_are_not(grouped):
    moe = ds_moe.MoE(16, _mlp(), 4, use_residual=True, grouped_experts=grouped)
    expert_ids = {id(p) for p in moe.experts.parameters()}
    assert expert_ids
    for p in moe.parameters():
        if id(p) in expert_ids:
            assert ds_moe.is_moe_param(p)
            assert p.ds_expert is True and p.allreduce is False
            assert p.ds_expert_group_name == p.group_name == "ep_size_1"
            assert p.ds_expert_dp_group is None  # no torch.distributed in this process
        else:
            assert not ds_moe.is_moe_param(p)
            assert not hasattr(p, "ds_expert_dp_group")
    assert moe.expert_group_name == "ep_size_1"
    assert moe.expert_ids == (0, 1, 2, 3)


@pytest.mark.parametrize("grouped", [None, False])
def test_deepcopy_keeps_the_expert_marks(grouped):
    # nn.Parameter.__deepcopy__ drops attributes; a copied model must still look MoE to ZeRO
    import copy

    model = nn.Sequential(nn.Linear(16, 16), ds_moe.MoE(16, _mlp(), 4, grouped_experts=grouped))
    clone = copy.deepcopy(model)
    marked = [ds_moe.is_moe_param(p) for p in model.parameters()]
    assert any(marked)
    assert [ds_moe.is_moe_param(p) for p in clone.parameters()] == marked
    for p, q in zip(model.parameters(), clone.parameters()):
        assert p is not q and torch.equal(p, q)
        assert getattr(q, "ds_expert_group_name", None) == getattr(p, "ds_expert_group_name", None)
    x = torch.randn(5, 16)
    torch.testing.assert_close(clone[1](x)[0], model[1](x)[0])


def test_split_params_for_optimizer():
    moe = ds_moe.MoE(16, _mlp(), 4)
    head = nn.Linear(16, 2)
    groups = ds_moe.split_params_into_different_moe_groups_for_optimizer(
        [
            {
                "params": list(moe.parameters()) + list(head.parameters()),
                "lr": 0.1,
                "weight_decay": 0.0,
            }
        ]
    )
    assert len(groups) == 2
    dense, experts = groups
    assert "moe" not in dense and dense["lr"] == 0.1
    assert {id(p) for p in dense["params"]} == {id(moe.gate.wg.weight)} | {
        id(p) for p in head.parameters()
    }
    assert experts["moe"] is True and experts["name"] == "ep_size_1"
    assert experts["lr"] == 0.1 and experts["weight_decay"] == 0.0
    assert {id(p) for p in experts["params"]} == {id(p) for p in moe.experts.parameters()}
    # usable as-is by a torch optimizer
    torch.optim.AdamW(groups)
    # a plain iterable and a single dict work too; only-expert input gives only the moe group
    assert len(ds_moe.split_params_into_different_moe_groups_for_optimizer(moe.parameters())) == 2
    only = ds_moe.split_params_into_different_moe_groups_for_optimizer(
        {"params": moe.experts.parameters()}
    )
    assert len(only) == 1 and only[0]["moe"]
    with pytest.raises(KeyError, match="no 'params' key"):
        ds_moe.split_params_into_different_moe_groups_for_optimizer([{"lr": 1.0}])


def test_group_lookup_without_layer_names_the_fix():
    ds_moe.create_expert_groups(1)
    assert ds_moe.get_expert_data_parallel_group("ep_size_1") is None
    with pytest.raises(KeyError, match="ds_moe.create_expert_groups"):
        ds_moe.get_expert_data_parallel_group("ep_size_8")
