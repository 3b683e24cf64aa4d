"""Tier 1: the fused combine and permutation backward against the unfused gathers.

The Triton kernels run here on the CPU under TRITON_INTERPRET=1 (numpy); without triton these
tests skip, and only then. The layer uses them on CUDA only (the GPU tests run the compiled
kernels in the layer). Exactness: for k <= 2 the fused path rounds the same fp32 values once
as the unfused one does, so outputs and gradients are equal; for k = 3 only the order of an
fp32 sum may differ.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from triton_interp import needs_triton

from ds_moe import _combine
from ds_moe._local_dispatch import combine, local_layout, permute
from ds_moe._routing import route

CPU = torch.device("cpu")


@pytest.fixture
def kernels(monkeypatch):
    """The kernel module, interpreted, with small tiles so every tiling edge is crossed."""
    k = importlib.import_module("ds_moe._combine_kernels")
    if not k.INTERPRET:
        pytest.skip(
            "triton compiles in this process (a GPU is present or TRITON_INTERPRET=0): "
            "test_moe_gpu.py checks the compiled kernels"
        )
    monkeypatch.setattr(k, "BLOCK_T", 4)
    monkeypatch.setattr(k, "BLOCK_D", 32)
    monkeypatch.setattr(k, "BWD_BLOCK_T", 4)
    monkeypatch.setattr(k, "BWD_BLOCK_D", 32)
    return k


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("shape", [(37, 70), (1, 32), (9, 5)])
def test_fused_equals_unfused(kernels, dtype, k, shape):
    # permute -> stand-in expert -> combine, forward and backward, with dropped choices and
    # NaN in the dead rows: outputs, token and expert-row gradients equal; the router's
    # logit gradient (through the weights' gradient, rounded once) within a bf16 ulp
    tokens, d = shape
    diff = _combine.compare_with_unfused(CPU, dtype, k, num_tokens=tokens, d=d)
    if k <= 2:
        assert diff["bitwise_equal"], diff
    assert diff["max_rel"] <= 2.0**-7, diff


def _routing(tokens: int, k: int, slots: int | None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return route(torch.randn(tokens, 4, generator=g), k, capacity_slots=slots)


@needs_triton
@pytest.mark.parametrize("k", [1, 2])
def test_combine_backward_writes_every_buffer_row_once(kernels, k):
    # each buffer row's gradient: w * grad_out of its token; the sentinel and the dead rows
    # (dropped choices, weight 0) are exact zeros even where the buffer holds NaN
    r = _routing(23, k, slots=4)
    lay = local_layout(r)
    assert not r.kept.all()  # capacity 4 of ~6 per expert drops some
    rows = 1 + 23 * k
    y = torch.randn(rows, 40).to(torch.bfloat16)
    y[lay.offs[-1] :] = float("nan")
    weight = r.combine_weight * r.kept
    up = torch.randn(23, 40).to(torch.bfloat16)
    grad_y, grad_w = kernels.combine_backward(up, y, weight, lay.row, lay.dest, True)
    expect = torch.zeros(rows, 40, dtype=torch.bfloat16)
    for s in range(23):
        for j in range(k):
            wj = weight[s, j].to(torch.bfloat16).float()
            expect[lay.dest[s, j]] = (up[s].float() * wj).to(torch.bfloat16)
    assert torch.equal(grad_y, expect)
    assert grad_y[lay.offs[-1] :].eq(0).all() and grad_y[0].eq(0).all()
    dots = torch.einsum("skd,sd->sk", y[lay.row].double(), up.double())
    torch.testing.assert_close(grad_w, dots.to(torch.bfloat16).float(), rtol=2**-7, atol=1e-6)
    _, none = kernels.combine_backward(up, y, weight, lay.row, lay.dest, False)
    assert none.numel() == 0


@needs_triton
def test_gather_sum_without_weights_sums_rows(kernels):
    src = torch.randn(50, 33).to(torch.bfloat16)
    index = torch.randint(0, 50, (17, 3))
    got = kernels.gather_sum(src, index, None)
    torch.testing.assert_close(got.float(), src[index].float().sum(1), rtol=2**-7, atol=1e-2)
    two = kernels.gather_sum(src, index[:, :2], None)
    assert torch.equal(two, src[index[:, :2]].sum(1))  # two terms: one rounding, as torch


@needs_triton
def test_probe_rejects_a_wrong_kernel(kernels, monkeypatch):
    assert _combine._self_check(CPU, torch.bfloat16)
    real = kernels.combine_backward

    def no_sentinel(g, y, w, i, d, need):  # forgets to zero the sentinel row
        grad_y, grad_w = real(g, y, w, i, d, need)
        grad_y[0] = 1.0
        return grad_y, grad_w

    monkeypatch.setattr(kernels, "combine_backward", no_sentinel)
    assert not _combine._self_check(CPU, torch.bfloat16)


def test_switch_and_cpu_path(monkeypatch):
    assert not _combine.fused_combine_available(CPU, torch.bfloat16)  # CUDA only
    monkeypatch.delenv("DS_MOE_FUSED_COMBINE", raising=False)
    assert _combine.fused_combine_requested(None)
    assert not _combine.fused_combine_requested(False)
    monkeypatch.setenv("DS_MOE_FUSED_COMBINE", "0")
    assert not _combine.fused_combine_requested(None)
    assert _combine.fused_combine_requested(True)
    monkeypatch.setenv("DS_MOE_FUSED_COMBINE", "on")
    with pytest.raises(ValueError, match="DS_MOE_FUSED_COMBINE='on'"):
        _combine.fused_combine_requested(None)


def test_unfused_path_with_layout_dest():
    # the layout's dest: every buffer row 1..S*k once; equal to row where the choice is kept
    for k, slots in ((1, 3), (2, 5), (3, None)):
        r = _routing(20, k, slots, seed=k)
        lay = local_layout(r)
        assert torch.equal(lay.dest.flatten().sort().values, torch.arange(1, 1 + 20 * k))
        assert torch.equal(lay.row[r.kept], lay.dest[r.kept]) and lay.row[~r.kept].eq(0).all()
        x = torch.randn(20, 8, requires_grad=True)
        out = combine(permute(x, lay) * 2.0, r, lay)
        assert out.shape == (20, 8)


def test_ops_have_meta_kernels():
    y = torch.empty(41, 8, device="meta", dtype=torch.bfloat16)
    index = torch.empty(20, 2, device="meta", dtype=torch.int64)
    w = torch.empty(20, 2, device="meta")
    out = torch.ops.ds_moe.gather_sum(y, index, w)
    gy, gw = torch.ops.ds_moe.combine_backward(out, y, w, index, index, True)
    assert out.shape == (20, 8) and gy.shape == (41, 8) and gw.shape == (20, 2)
    assert gw.dtype == torch.float32 and out.device.type == "meta"


def _random_shapes(n: int) -> list[tuple[int, int, int]]:
    """``n`` (k, tokens, d) drawn once from a fixed seed, ragged against every tile."""
    import random

    rnd = random.Random(10)
    return [(rnd.randint(1, 4), rnd.randint(1, 90), rnd.randint(1, 130)) for _ in range(n)]


@needs_triton
@pytest.mark.parametrize("k,tokens,d", _random_shapes(12))
def test_fused_equals_unfused_on_random_shapes(kernels, k, tokens, d):
    diff = _combine.compare_with_unfused(CPU, torch.bfloat16, k, num_tokens=tokens, d=d)
    if k <= 2:
        assert diff["bitwise_equal"], diff
    assert diff["max_rel"] <= 2.0**-7, diff
