"""Tier 1: the router's math (selection, capacity, priority, RTS, losses, validation)."""

from __future__ import annotations

import math

import pytest
import torch

import ds_moe
from ds_moe._config import GateConfig


def _logits(s=12, e=4, seed=0):
    return torch.randn(s, e, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("s", "e", "k", "cf", "minc", "want"),
    [(16, 4, 1, 1.0, 4, 4), (16, 4, 2, 1.0, 4, 8), (16, 4, 1, 1.25, 4, 5), (8, 8, 1, 1.0, 4, 4),
     (10, 3, 2, 1.5, 0, 10)],
)  # fmt: skip
def test_capacity_formula(s, e, k, cf, minc, want):
    assert ds_moe.capacity(s, e, k, cf, minc) == want == max(math.ceil(k * s * cf / e), minc)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_selection_and_weights(k):
    logits = _logits()
    r = ds_moe.route(logits, k, capacity_slots=None)
    gates = torch.softmax(logits, -1)
    top = torch.topk(gates, k, -1)
    assert torch.equal(r.expert_index, top.indices)
    want = top.values if k == 1 else top.values / top.values.sum(-1, keepdim=True)
    torch.testing.assert_close(r.combine_weight, want)
    assert r.kept.all()
    assert torch.equal(r.exp_counts, torch.bincount(top.indices.reshape(-1), minlength=4))
    assert int(r.kept_counts.sum()) == r.order.numel() == 12 * k


def test_capacity_serves_first_choices_first_then_token_order():
    # every token prefers expert 0, then expert 1
    logits = torch.tensor([[3.0, 2.0, 0.0, -1.0]] * 6)
    r = ds_moe.route(logits, 2, capacity_slots=4)
    # expert 0 takes tokens 0..3 (first choices), expert 1 takes tokens 0..3 (second choices)
    assert r.kept[:, 0].tolist() == [True] * 4 + [False] * 2
    assert r.kept[:, 1].tolist() == [True] * 4 + [False] * 2
    assert r.kept_counts.tolist() == [4, 4, 0, 0]
    assert r.exp_counts.tolist() == [6, 6, 0, 0]
    n = int(r.kept_counts.sum())
    # kept assignments grouped by expert in priority order: (choice 0, tokens 0-3), (choice 1, 0-3)
    assert r.order[:n].tolist() == [0, 1, 2, 3, 6, 7, 8, 9]
    assert sorted(r.order[n:].tolist()) == [4, 5, 10, 11]


def test_second_choice_loses_to_other_tokens_first_choice():
    # token 0 wants (1, 0); tokens 1, 2 want expert 0 first: with one slot per expert,
    # token 1's first choice beats token 0's second choice although token 0 comes first
    logits = torch.tensor([[1.0, 3.0, -5.0], [3.0, 1.0, -5.0], [3.0, 1.0, -5.0]])
    r = ds_moe.route(logits, 2, capacity_slots=1)
    assert r.kept.tolist() == [[True, False], [True, False], [False, False]]


def test_rts_keeps_a_random_subset_of_capacity_size():
    logits = torch.tensor([[5.0, 0.0]] * 20)
    kept_sets = set()
    for seed in range(5):
        prio = torch.randperm(20, generator=torch.Generator().manual_seed(seed))
        r = ds_moe.route(logits, 1, capacity_slots=6, token_priority=prio)
        kept = r.kept[:, 0]
        assert int(kept.sum()) == 6
        # the kept ones are exactly the 6 best-ranked by the priority
        assert set(torch.nonzero(kept).flatten().tolist()) == set(torch.argsort(prio)[:6].tolist())
        kept_sets.add(tuple(kept.tolist()))
    assert len(kept_sets) > 1


def test_used_token_masks_tokens_out():
    logits = _logits(8, 3)
    used = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1])
    r = ds_moe.route(logits, 1, capacity_slots=None, used_token=used)
    assert r.kept[:, 0].tolist() == used.bool().tolist()
    want = torch.bincount(r.expert_index[used.bool(), 0], minlength=3)
    assert torch.equal(r.exp_counts, want)
    with pytest.raises(ValueError, match="used_token has 3 entries for 8 tokens"):
        ds_moe.route(logits, 1, capacity_slots=None, used_token=torch.ones(3))


@pytest.mark.parametrize("k", [1, 2])
def test_aux_loss_formula(k):
    logits = _logits(32, 4, seed=3)
    r = ds_moe.route(logits, k, capacity_slots=2)  # drops do not change the loss
    gates = torch.softmax(logits, -1)
    idx = torch.topk(gates, k, -1).indices
    mask = torch.zeros(32, 4).scatter_(1, idx, 1.0)
    # DeepSpeed topkgating: mean(me * ce) * E * E / k with ce = mean(mask)
    want = torch.mean(gates.mean(0) * mask.mean(0)) * 4 * 4 / k
    torch.testing.assert_close(r.l_aux, want)
    # uniform router -> 1.0
    uniform = ds_moe.load_balancing_loss(
        torch.full((8, 4), 0.25), torch.tensor([2, 2, 2, 2]) * k, k
    )
    torch.testing.assert_close(uniform, torch.tensor(1.0))


def test_z_loss_added_with_coefficient():
    logits = _logits(16, 4) * 3
    base = ds_moe.route(logits, 1, capacity_slots=None).l_aux
    with_z = ds_moe.route(logits, 1, capacity_slots=None, router_z_loss_coef=0.1).l_aux
    z = torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(ds_moe.router_z_loss(logits), z)
    torch.testing.assert_close(with_z, base + 0.1 * z)


def test_aux_loss_gradient_reaches_logits():
    logits = _logits(16, 4).requires_grad_()
    r = ds_moe.route(logits, 2, capacity_slots=None, router_z_loss_coef=1e-3)
    (r.l_aux + r.combine_weight.sum()).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_selection_logits_choose_but_weights_stay_clean():
    logits = _logits(10, 4)
    sel = -logits  # pick the worst experts
    r = ds_moe.route(logits, 1, capacity_slots=None, selection_logits=sel)
    assert torch.equal(r.expert_index[:, 0], logits.argmin(-1))
    torch.testing.assert_close(
        r.combine_weight[:, 0], torch.softmax(logits, -1).gather(1, r.expert_index)[:, 0]
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_experts": 4, "k": 5}, "k=5 must be an int in"),
        ({"num_experts": 0}, "num_experts=0"),
        ({"num_experts": [4, 8]}, "pyramid_moe_layers"),
        ({"num_experts": 4, "capacity_factor": 0}, "capacity_factor=0"),
        ({"num_experts": 4, "eval_capacity_factor": -1.0}, "eval_capacity_factor"),
        ({"num_experts": 4, "min_capacity": -1}, "min_capacity"),
        ({"num_experts": 4, "router_z_loss_coef": -1}, "router_z_loss_coef"),
    ],
)
def test_config_errors_name_the_argument(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        GateConfig(**kwargs)


def test_noisy_policy_parse():
    assert ds_moe.NoisyGatePolicy.parse(None) is ds_moe.NoisyGatePolicy.NONE
    assert ds_moe.NoisyGatePolicy.parse("None") is ds_moe.NoisyGatePolicy.NONE  # DeepSpeed's
    layer = ds_moe.MoE(4, torch.nn.Linear(4, 4), num_experts=2, noisy_gate_policy="None")
    assert layer.gate.config.noisy_gate_policy is ds_moe.NoisyGatePolicy.NONE
    assert ds_moe.NoisyGatePolicy.parse("Jitter") is ds_moe.NoisyGatePolicy.JITTER
    assert ds_moe.NoisyGatePolicy.parse("RSample") is ds_moe.NoisyGatePolicy.RSAMPLE
    with pytest.raises(ValueError, match="'Jitter' or 'RSample'"):
        ds_moe.NoisyGatePolicy.parse("gumbel")
