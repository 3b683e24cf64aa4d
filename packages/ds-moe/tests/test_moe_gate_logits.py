"""Tier 1: the router's fused fp32 logits (no fp32 copy of the tokens) against ``F.linear`` on
fp32 copies.

The Triton kernels run here on the CPU under TRITON_INTERPRET=1 (numpy); without triton these
tests skip, and only then. The router uses them on CUDA only: on the CPU its path is
``F.linear``, checked below too. Tolerance: products are exact in fp32 either way and only the
order of the fp32 sums differs, so logits agree to fp32 rounding, and the gradients, rounded to
bf16/fp16 once, by one ulp of that dtype at most.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from triton_interp import needs_triton

from ds_moe import _gate_linear
from ds_moe._config import GateConfig
from ds_moe._gate import TopKGate

ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@pytest.fixture
def kernels(monkeypatch):
    """The kernel module, interpreted, with small tiles so that every tiling edge is crossed
    at test sizes (ragged token, hidden and split tiles)."""
    k = importlib.import_module("ds_moe._gate_kernels")
    if not k.INTERPRET:
        pytest.skip(
            "triton compiles in this process (a GPU is present or TRITON_INTERPRET=0): "
            "test_moe_gpu.py checks the compiled kernels"
        )
    monkeypatch.setattr(k, "BLOCK_S", 16)
    monkeypatch.setattr(k, "BLOCK_H", 32)
    monkeypatch.setattr(k, "WG_BLOCK_S", 16)
    monkeypatch.setattr(k, "ROWS_PER_SPLIT", 48)
    return k


def _reference(x, w, up):
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = _gate_linear.reference(xr, wr)
    out.backward(up)
    return out.detach(), xr.grad, wr.grad


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(100, 70, 8), (16, 32, 3), (1, 5, 20), (130, 64, 16)])
def test_logits_and_gradients_match_fp32_linear(kernels, dtype, shape):
    s, h, e = shape
    torch.manual_seed(0)
    x = torch.randn(s, h).to(dtype)
    w = (torch.randn(e, h) * 0.2).to(dtype)
    up = torch.randn(s, e)
    xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = _gate_linear.gate_logits(xf, wf)
    out.backward(up)
    ref, ref_dx, ref_dw = _reference(x, w, up)
    assert out.dtype == torch.float32 and out.shape == (s, e)
    assert xf.grad.dtype == dtype and wf.grad.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xf.grad, ref_dx, rtol=ULP[dtype], atol=1e-5)
    torch.testing.assert_close(wf.grad, ref_dw, rtol=ULP[dtype], atol=1e-4)


@needs_triton
def test_weight_gradient_is_deterministic_and_sums_every_split(kernels):
    torch.manual_seed(1)
    x = torch.randn(200, 40).to(torch.bfloat16)  # 5 splits of 48 rows, the last ragged
    g = torch.randn(200, 8)
    a = kernels.weight_grad(g, x, torch.float32)
    b = kernels.weight_grad(g, x, torch.float32)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, g.double().t().mm(x.double()).float(), rtol=1e-5, atol=1e-5)


@needs_triton
def test_only_the_asked_gradients_are_computed(kernels):
    x = torch.randn(20, 16).to(torch.bfloat16)
    w = torch.randn(4, 16).to(torch.bfloat16).requires_grad_()
    _gate_linear.gate_logits(x, w).sum().backward()  # x needs no gradient
    assert x.grad is None and w.grad is not None


@needs_triton
def test_zero_tokens(kernels):
    x = torch.empty(0, 16, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(4, 16).to(torch.bfloat16).requires_grad_()
    out = _gate_linear.gate_logits(x, w)
    assert out.shape == (0, 4)
    out.sum().backward()
    assert torch.count_nonzero(w.grad) == 0 and x.grad.shape == (0, 16)


def test_meta_kernels_give_the_shapes():
    x = torch.empty(10, 16, dtype=torch.bfloat16, device="meta")
    w = torch.empty(4, 16, dtype=torch.bfloat16, device="meta")
    out = torch.ops.ds_moe.gate_logits(x, w)
    assert out.shape == (10, 4) and out.dtype == torch.float32
    dx, dw = torch.ops.ds_moe.gate_logits_backward(out, x, w, True, False)
    assert dx.shape == x.shape and dx.dtype == x.dtype and dw.numel() == 0


def test_cpu_router_keeps_the_fp32_linear(monkeypatch):
    # on the CPU the probe says no, whatever is asked: the router's logits are F.linear's
    monkeypatch.setenv(_gate_linear.ENV_VAR, "1")
    gate = TopKGate(16, GateConfig(num_experts=4, k=2)).to(torch.bfloat16)
    called = []
    monkeypatch.setattr(
        "ds_moe._gate.gate_logits", lambda *a: called.append(1) or _gate_linear.gate_logits(*a)
    )
    x = torch.randn(12, 16).to(torch.bfloat16)
    gate(x)
    assert not called
    assert not _gate_linear.fused_gate_available(torch.device("cpu"), torch.bfloat16)


def test_switch_reads_the_flag_before_the_variable(monkeypatch):
    monkeypatch.delenv(_gate_linear.ENV_VAR, raising=False)
    assert not _gate_linear.fused_gate_requested(None)  # off by default
    monkeypatch.setenv(_gate_linear.ENV_VAR, "1")
    assert _gate_linear.fused_gate_requested(None)
    assert not _gate_linear.fused_gate_requested(False)
    monkeypatch.setenv(_gate_linear.ENV_VAR, "0")
    assert _gate_linear.fused_gate_requested(True)


@needs_triton
@pytest.mark.parametrize("k", [1, 2])
def test_router_with_fused_logits_routes_like_the_unfused_one(kernels, monkeypatch, k):
    # the gate module with the fused logits forced on (the probe is CUDA-only) against the
    # same module on F.linear: same routing, l_aux and gradients to fp32/bf16 rounding
    monkeypatch.setattr("ds_moe._gate.fused_gate_available", lambda d, t: True)
    torch.manual_seed(0)
    cfg = GateConfig(
        num_experts=6, k=k, use_rts=False, capacity_factor=1.0, top2_2nd_expert_sampling=False
    )  # no random draws: both runs comparable
    gate = TopKGate(48, cfg).to(torch.bfloat16)
    x = torch.randn(90, 48).to(torch.bfloat16)
    runs = []
    for fuse in (True, False):
        gate.fuse_logits = fuse
        gate.zero_grad()
        xi = x.clone().requires_grad_()
        r = gate(xi)
        loss = (r.combine_weight * torch.arange(1.0, k + 1)).sum() + r.l_aux
        loss.backward()
        runs.append((r, xi.grad, gate.wg.weight.grad.clone()))
    (a, dxa, dwa), (b, dxb, dwb) = runs
    assert torch.equal(a.expert_index, b.expert_index)
    assert torch.equal(a.kept, b.kept) and torch.equal(a.order, b.order)
    torch.testing.assert_close(a.combine_weight, b.combine_weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.l_aux, b.l_aux, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dxa, dxb, rtol=2.0**-7, atol=1e-5)
    torch.testing.assert_close(dwa, dwb, rtol=2.0**-7, atol=1e-4)
