"""The leaner routing and layout decide exactly what 0.1.3's did, so outputs are bitwise equal.

``routing_before.py`` holds 0.1.3's sort-based ``route`` and ``local_layout``; every field of
the new ones must be identical (integers equal, weights and losses bitwise), on both of the
new ranking paths (counting and, past its size limit, sorting), for top-1/2/3, capacity or
dropless, with RTS priorities and padding tokens. The layer-level test runs a whole
forward+backward through the 0.1.3 routing and layout and through 0.1.4's, same weights.
"""

from __future__ import annotations

import pytest
import torch
from routing_before import local_layout_before, route_before
from torch import nn

import ds_moe
import ds_moe._layer as layer_mod
import ds_moe._routing as routing_mod
from ds_moe._local_dispatch import local_layout

CASES = [
    # (tokens, experts, k, capacity slots or None, RTS priority, padding tokens)
    (64, 4, 1, 10, False, False),
    (64, 4, 1, 10, True, False),
    (64, 4, 2, 20, True, True),
    (50, 8, 2, None, False, True),
    (50, 8, 3, 12, True, False),
    (33, 5, 1, None, True, True),
    (40, 4, 2, 1, False, False),
    (7, 3, 3, 0, True, True),
    (0, 4, 2, 4, False, False),
]


def _inputs(s, e, rts, padding, seed):
    g = torch.Generator().manual_seed(seed)
    # a skewed router so capacity drops some choices
    logits = torch.randn(s, e, generator=g) + torch.linspace(1.5, 0.0, e)
    prio = torch.randperm(s, generator=g) if rts else None
    used = (torch.rand(s, generator=g) > 0.25) if padding else None
    return logits, prio, used


def _same(a, b) -> None:
    for field in ("expert_index", "kept", "order", "kept_counts", "exp_counts"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    # bitwise, not only equal values
    for field in ("combine_weight", "l_aux"):
        x, y = getattr(a, field), getattr(b, field)
        assert torch.equal(x.view(torch.int32), y.view(torch.int32)), field
    assert a.capacity == b.capacity


@pytest.mark.parametrize("counting", [True, False], ids=["counting", "sorting"])
@pytest.mark.parametrize(("s", "e", "k", "cap", "rts", "padding"), CASES)
def test_route_equals_0_1_3(monkeypatch, counting, s, e, k, cap, rts, padding):
    if not counting:
        monkeypatch.setattr(routing_mod, "_COUNTED_RANK_MAX", 0)
    for seed in range(3):
        logits, prio, used = _inputs(s, e, rts, padding, seed)
        kw = dict(capacity_slots=cap, token_priority=prio, used_token=used)
        new = ds_moe.route(logits, k, router_z_loss_coef=0.01, **kw)
        old = route_before(logits, k, router_z_loss_coef=0.01, **kw)
        _same(new, old)
        # position is the inverse permutation of order
        n = s * k
        assert torch.equal(new.order.index_select(0, new.position), torch.arange(n))
        lay_new, lay_old = local_layout(new), local_layout_before(old)
        for field in ("row", "token_of_row", "assignment_of_row", "offs", "dest"):
            a, b = getattr(lay_new, field), getattr(lay_old, field)
            assert a.dtype == b.dtype and torch.equal(a, b), field
        assert lay_new.row.is_contiguous() and lay_new.dest.is_contiguous()


def _bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("drop_tokens", [True, False])
def test_layer_forward_backward_bitwise_equal_to_0_1_3(monkeypatch, k, drop_tokens):
    torch.manual_seed(0)
    d = 16
    expert = nn.Sequential(nn.Linear(d, 32), nn.GELU(), nn.Linear(32, d))
    moe = ds_moe.MoE(d, expert, num_experts=4, k=k, capacity_factor=0.8,
                     drop_tokens=drop_tokens, top2_2nd_expert_sampling=False).train()  # fmt: skip
    with torch.no_grad():
        for p in moe.experts.parameters():
            p.add_(torch.randn(p.shape) * 0.2)  # distinct experts
    x = torch.randn(2, 40, d)

    def run(route_fn, layout_fn):
        monkeypatch.setattr(routing_mod, "route", route_fn)
        monkeypatch.setattr(layer_mod, "local_layout", layout_fn)
        import ds_moe._gate as gate_mod

        monkeypatch.setattr(gate_mod, "route", route_fn)
        moe.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        torch.manual_seed(1)  # the same RTS permutation for both
        out, l_aux, counts = moe(xi)
        (out.square().mean() + l_aux).backward()
        grads = [p.grad.clone() for p in moe.parameters()]
        return out.detach(), l_aux.detach(), counts, xi.grad, grads

    new = run(ds_moe.route, local_layout)
    old = run(route_before, local_layout_before)
    assert _bitwise(new[0], old[0]) and _bitwise(new[1], old[1]) and torch.equal(new[2], old[2])
    assert _bitwise(new[3], old[3])
    assert all(_bitwise(a, b) for a, b in zip(new[4], old[4], strict=True))
