"""Tier 1: the router's fused capacity and placement against the torch ops of ``route``.

The Triton kernels run here on the CPU under TRITON_INTERPRET=1 (numpy); without triton these
tests skip, and only then. Integers only, so every field must be equal.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from triton_interp import needs_triton

from ds_moe import _route_fused
from ds_moe._routing import route

CPU = torch.device("cpu")


@pytest.fixture
def interpreted():
    """The kernel module, interpreted, at its own chunk sizes."""
    k = importlib.import_module("ds_moe._route_kernels")
    if not k.INTERPRET:
        pytest.skip(
            "triton compiles in this process (a GPU is present or TRITON_INTERPRET=0): "
            "test_moe_gpu.py checks the compiled kernels"
        )
    return k


@pytest.fixture
def kernels(interpreted, monkeypatch):
    """The interpreted kernels with small chunks, so many chunks and prefix steps run."""
    k = interpreted
    monkeypatch.setattr(k, "CHUNK_CELLS", 128)
    monkeypatch.setattr(k, "PREFIX_STEP", 4)
    monkeypatch.setattr(k, "SCATTER_BLOCK", 64)
    return k


@needs_triton
@pytest.mark.parametrize(
    "tokens,experts,k,slots,rts",
    [
        (300, 4, 1, 60, True),
        (300, 4, 1, None, False),
        (257, 8, 2, 50, True),
        (257, 8, 2, None, True),
        (100, 5, 3, 40, False),
        (64, 3, 2, 0, True),  # capacity 0: every choice dropped
        (1, 2, 2, 1, True),
        (0, 4, 2, 4, False),
        (90, 40, 1, 2, True),  # more experts than the chunk holds cells of
    ],
)
def test_fused_placement_equals_torch(kernels, tokens, experts, k, slots, rts):
    assert _route_fused.compare_with_torch(CPU, tokens, experts, k, slots, rts, skew=2.0)


@needs_triton
@pytest.mark.parametrize("k", [1, 2, 3])
def test_fused_layout_equals_local_layout(kernels, k):
    # the layout the placement kernel writes on the way equals _local_dispatch's from the
    # torch routing (compare_with_torch checks it too; here with drops on every expert)
    from ds_moe._local_dispatch import local_layout

    g = torch.Generator().manual_seed(k)
    logits = torch.randn(150, 6, generator=g)
    prio = torch.randperm(150, generator=g)
    a = route(logits, k, capacity_slots=10, token_priority=prio, fused=True)
    b = route(logits, k, capacity_slots=10, token_priority=prio, fused=False)
    assert a.local is not None and b.local is None
    la, lb = local_layout(a), local_layout(b)
    for field in ("row", "dest", "token_of_row", "offs", "assignment_of_row"):
        assert torch.equal(getattr(la, field), getattr(lb, field)), field
        assert getattr(la, field).dtype == getattr(lb, field).dtype, field
    assert la.row.eq(0).sum() == (~a.kept).sum()


@needs_triton
def test_drops_and_placement_are_as_documented(kernels):
    # a skewed router overflows: the kept assignments come first, grouped by expert in
    # priority order, then the dropped ones, and ``order`` inverts ``position``
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(200, 4, generator=g) + torch.tensor([0.0, 0.0, 0.0, 2.0])
    prio = torch.randperm(200, generator=g)
    r = route(logits, 2, capacity_slots=60, token_priority=prio, fused=True)
    assert not r.kept.all() and int(r.kept_counts.sum()) == int(r.kept.sum())
    assert torch.equal(r.order[r.position], torch.arange(400))
    kept_a = r.order[: int(r.kept_counts.sum())]
    flat_e = r.expert_index.t().reshape(-1)
    assert torch.equal(flat_e[kept_a], flat_e[kept_a].sort(stable=True).values)


@needs_triton
def test_probe_rejects_a_wrong_kernel(interpreted, monkeypatch):
    # the probe's own cases at the kernels' own chunk sizes (small chunks take minutes here)
    kernels = interpreted
    assert _route_fused._self_check(CPU)
    real = kernels.place

    def off_by_one(idx, rank, e, cap):  # a capacity one slot too large
        return real(idx, rank, e, None if cap is None else cap + 1)

    monkeypatch.setattr(kernels, "place", off_by_one)
    assert not _route_fused._self_check(CPU)


def test_switch_cpu_and_padding_tokens_keep_torch(monkeypatch):
    assert not _route_fused.fused_route_available(CPU)
    monkeypatch.delenv("DS_MOE_FUSED_ROUTE", raising=False)
    assert _route_fused.fused_route_requested(None)
    assert not _route_fused.fused_route_requested(False)
    monkeypatch.setenv("DS_MOE_FUSED_ROUTE", "0")
    assert not _route_fused.fused_route_requested(None)
    monkeypatch.setenv("DS_MOE_FUSED_ROUTE", "true")
    with pytest.raises(ValueError, match="DS_MOE_FUSED_ROUTE='true'"):
        _route_fused.fused_route_requested(None)
    # with padding tokens ``fused`` is ignored: the torch path, which knows used_token
    monkeypatch.setattr(_route_fused, "place", lambda *a: pytest.fail("fused with used_token"))
    logits = torch.randn(10, 4)
    used = torch.arange(10) < 7
    r = route(logits, 1, capacity_slots=3, used_token=used, fused=True)
    assert int(r.kept_counts.sum()) <= 7


def test_op_has_a_meta_kernel():
    idx = torch.empty(50, 2, device="meta", dtype=torch.int64)
    out = torch.ops.ds_moe.route_place(idx, None, 8, 10, True)
    shapes = [(100,), (100,), (100,), (8,), (8,), (50, 2), (50, 2), (101,), (8,)]
    assert [tuple(t.shape) for t in out] == shapes
    assert out[2].dtype == torch.bool and out[8].dtype == torch.int32
    assert out[0].device.type == "meta"


def _random_cases(n: int) -> list[tuple]:
    """``n`` routing shapes drawn once from a fixed seed: tokens, experts, k, capacity
    (None, 0, tight or loose), RTS, skew."""
    import random

    rnd = random.Random(27)
    cases = []
    for _ in range(n):
        tokens, experts = rnd.randint(1, 160), rnd.randint(1, 40)
        k = rnd.randint(1, min(3, experts))
        slots = rnd.choice([None, 0, max(1, tokens * k // (2 * experts)), tokens * k])
        cases.append((tokens, experts, k, slots, rnd.random() < 0.5, rnd.choice([0.0, 3.0])))
    return cases


@needs_triton
@pytest.mark.parametrize("tokens,experts,k,slots,rts,skew", _random_cases(24))
def test_fused_placement_equals_torch_on_random_shapes(kernels, tokens, experts, k, slots, rts,
                                                       skew):  # fmt: skip
    assert _route_fused.compare_with_torch(CPU, tokens, experts, k, slots, rts, skew=skew)
