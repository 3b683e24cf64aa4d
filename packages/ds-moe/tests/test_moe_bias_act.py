"""Tier 1: the fused bias + activation kernels against the unfused path.

The Triton kernels run here on the CPU under TRITON_INTERPRET=1 (numpy); without triton these
tests skip, and only then (an error importing the kernels with triton installed fails). The
layer uses the kernels on CUDA only: on the CPU its path is the unfused one, checked below too.
Tolerance: the kernels round ``y + b`` to the storage dtype as the unfused add does and use
torch's fp32 formulas, so outputs and input gradients differ by the last bit of the
transcendental functions at most (1 ulp of the dtype); the bias gradient by the order of an
fp32 sum (1 ulp).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn
from triton_interp import needs_triton

import ds_moe
from ds_moe import _bias_act

ACTS = {
    "relu": nn.ReLU(),
    "gelu": nn.GELU(),
    "gelu_tanh": nn.GELU(approximate="tanh"),
    "silu": nn.SiLU(),
}
# one ulp of the dtype near 1 (outputs are O(1) here); fp32: a few ulps of numpy vs torch's
# vectorized transcendental functions
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2**-7, atol=2**-7),
    torch.float16: dict(rtol=2**-10, atol=2**-10),
}


@pytest.fixture
def kernels():
    """The kernel module, interpreted (TRITON_INTERPRET=1 was set before triton's import)."""
    k = importlib.import_module("ds_moe._bias_act_kernels")
    if not k.INTERPRET:
        pytest.skip(
            "triton compiles in this process (a GPU is present or TRITON_INTERPRET=0): "
            "test_moe_gpu.py checks the compiled kernels"
        )
    return k


class _MyGELU(nn.GELU):
    """A subclass may change forward: not fused."""


def _groups(sizes, tail):
    ends = torch.tensor(sizes).cumsum(0).to(torch.int32)
    return ends, int(ends[-1]) + tail


def _reference(y, bias, offs, act, dh):
    """Unfused: output and input gradient by torch autograd, bias gradient summed in fp64."""
    end = int(offs[-1])
    yr = y[:end].clone().requires_grad_()
    h = _bias_act.reference(yr, bias, offs, act)
    h.backward(dh[:end])
    group = torch.searchsorted(offs, torch.arange(end, dtype=torch.int32), right=True)
    db = torch.zeros(bias.shape, dtype=torch.float64).index_add_(0, group, yr.grad.double())
    return h.detach(), yr.grad, db


SIZES = [
    [5, 0, 11, 3],  # uneven, an empty group inside
    [0, 0, 9],  # empty groups first
    [7, 13, 0],  # an empty group last
    [1, 1, 1, 1, 1, 2],  # many groups in one tile
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("tiles", ["default", "small"])
def test_kernels_match_unfused_math(kernels, monkeypatch, dtype, act, tiles):
    if tiles == "small":
        # 4-row tiles: groups span tiles, tiles hold several groups, ragged column tiles
        monkeypatch.setattr(kernels, "tile_shape", lambda cols: (4, 16, 1))
    torch.manual_seed(0)
    code = _bias_act.activation_code(ACTS[act])
    for sizes in SIZES:
        offs, rows = _groups(sizes, tail=3)
        y = (torch.randn(rows, 40) * 2).to(dtype)
        bias = torch.randn(len(sizes), 40).to(dtype)
        dh = torch.randn(rows, 40).to(dtype)
        end = int(offs[-1])
        # rows past the last group are undefined on the grouped path: nothing may read them
        y[end:] = float("nan")
        dh[end:] = float("nan")
        h = torch.ops.ds_moe.bias_act(y, bias, offs, code)
        dz, db = torch.ops.ds_moe.bias_act_backward(dh, y, bias, offs, code)
        ref_h, ref_dz, ref_db = _reference(y, bias, offs, ACTS[act], dh)
        assert h.dtype == dz.dtype == db.dtype == dtype
        torch.testing.assert_close(h[:end], ref_h, **TOL[dtype])
        torch.testing.assert_close(dz[:end], ref_dz, **TOL[dtype])
        torch.testing.assert_close(db.double(), ref_db, **TOL[dtype])
        # an empty group's bias gradient is exactly zero
        for g, n in enumerate(sizes):
            if n == 0:
                assert torch.count_nonzero(db[g]) == 0


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_forward_rounds_the_biased_input_like_the_unfused_add(kernels, dtype):
    # y + b is rounded to the dtype before the activation, as the unfused in-place add
    # stores it. ReLU is exact: equal bit for bit. SiLU's exp differs between numpy and torch
    # by an fp32 ulp at most, which moves a rounded output rarely; without the rounding of
    # y + b about a quarter of the outputs would differ.
    torch.manual_seed(0)
    y = (torch.randn(256, 64) * 2).to(dtype)
    bias = torch.randn(3, 64).to(dtype)
    offs = torch.tensor([100, 100, 256], dtype=torch.int32)
    h = torch.ops.ds_moe.bias_act(y, bias, offs, _bias_act.RELU)
    assert torch.equal(h, _bias_act.reference(y, bias, offs, nn.ReLU()))
    h = torch.ops.ds_moe.bias_act(y, bias, offs, _bias_act.SILU)
    differ = (h != _bias_act.reference(y, bias, offs, nn.SiLU())).float().mean().item()
    assert differ < 1e-3, differ


def _experts(act, dtype, bias=True):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32, bias=bias), act, nn.Linear(32, 16, bias=bias))
    m = ds_moe.GroupedMLPExperts(mlp, 4).to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return m


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act", list(ACTS))
def test_grouped_experts_fused_match_unfused(kernels, monkeypatch, dtype, act):
    """Output, input, weight and bias gradients of the experts, fused vs today's path."""
    if not ds_moe.grouped_mm_available(torch.device("cpu"), dtype):
        pytest.skip(f"torch {torch.__version__} has no CPU _grouped_mm for {dtype}")
    calls = []
    for name in ("forward", "backward"):
        fn = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _fn=fn, _n=name: calls.append(_n) or _fn(*a))
    monkeypatch.setattr(_bias_act, "_probe", lambda *a: True)  # the CUDA probe, on the CPU
    monkeypatch.setattr(kernels, "tile_shape", lambda cols: (4, 16, 1))
    fused = _experts(ACTS[act], dtype)
    fused.fuse_bias_act = True
    unfused = _experts(ACTS[act], dtype)
    unfused.fuse_bias_act = False  # the default is fused
    sizes = [5, 0, 11, 3]
    offs, rows = _groups(sizes, tail=4)  # 4 rows past the last group: dropped choices
    x = torch.randn(rows, 16).to(dtype)
    g = torch.randn(rows, 16).to(dtype)
    res = []
    for m in (fused, unfused):
        xi = x.clone().requires_grad_()
        y = m(xi, offs=offs)
        y[: int(offs[-1])].backward(g[: int(offs[-1])])
        res.append(
            [y[: int(offs[-1])], xi.grad[: int(offs[-1])], *[p.grad for p in m.parameters()]]
        )
    assert calls == ["forward", "backward"]  # the fused path ran, once each way
    names = ["out", "x.grad", *[n for n, _ in fused.named_parameters()]]
    # differences in h and dz (1 ulp) pass through the second GEMM and the weight gradients
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    for name, a, b in zip(names, *res):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, n=name: f"{n}: {m}")
    # the empty expert's parameters get exactly-zero gradients
    for p in fused.parameters():
        assert torch.count_nonzero(p.grad[1]) == 0


@needs_triton
def test_probe_rejects_a_wrong_kernel(kernels, monkeypatch):
    # the probe's self-check (what runs once per device, dtype and activation on CUDA) passes
    # the interpreted kernels and fails a kernel that forgets the bias
    for act in ACTS.values():
        assert _bias_act._self_check(
            torch.device("cpu"), torch.bfloat16, _bias_act.activation_code(act)
        )
    real = kernels.forward
    monkeypatch.setattr(kernels, "forward", lambda y, b, o, a: real(y, torch.zeros_like(b), o, a))
    assert not _bias_act._self_check(torch.device("cpu"), torch.bfloat16, _bias_act.GELU)


def test_cpu_keeps_the_unfused_path(monkeypatch):
    cpu = torch.device("cpu")
    assert not _bias_act.fused_bias_act_available(cpu, torch.float32, _bias_act.GELU)
    m = _experts(nn.GELU(), torch.float32)
    assert _bias_act.fused_code(m.activation, m.b1, torch.zeros(1, 16)) is None
    # where the probe says yes, the activation has its kernel code
    monkeypatch.setattr(_bias_act, "_probe", lambda *a: True)
    x = torch.zeros(1, 16)
    assert _bias_act.fused_code(m.activation, m.b1, x) == _bias_act.GELU
    # on by default; DS_MOE_FUSED_BIAS_ACT=0 turns it off; the attribute beats the variable
    monkeypatch.delenv("DS_MOE_FUSED_BIAS_ACT", raising=False)
    assert _bias_act.fused_bias_act_requested(None)
    assert not _bias_act.fused_bias_act_requested(False)
    monkeypatch.setenv("DS_MOE_FUSED_BIAS_ACT", "0")
    assert not _bias_act.fused_bias_act_requested(None)
    assert _bias_act.fused_bias_act_requested(True)
    monkeypatch.setenv("DS_MOE_FUSED_BIAS_ACT", "1")
    assert _bias_act.fused_bias_act_requested(None)
    assert not _bias_act.fused_bias_act_requested(False)
    monkeypatch.setenv("DS_MOE_FUSED_BIAS_ACT", "yes")  # neither on nor off: said so
    with pytest.raises(ValueError, match="DS_MOE_FUSED_BIAS_ACT='yes'"):
        _bias_act.fused_bias_act_requested(None)
    monkeypatch.delenv("DS_MOE_FUSED_BIAS_ACT")
    # no bias, another dtype, other activations (exact types only): unfused
    assert _bias_act.fused_code(m.activation, None, x) is None
    assert _bias_act.fused_code(m.activation, m.b1.to(torch.float64), x) is None
    for act in (nn.Tanh(), nn.LeakyReLU(), _MyGELU()):
        assert _bias_act.fused_code(act, m.b1, x) is None


def test_ops_have_meta_kernels():
    # moe_phases.py counts the fused path's bytes on the meta device (no triton needed)
    y = torch.empty(10, 8, device="meta", dtype=torch.bfloat16)
    b = torch.empty(3, 8, device="meta", dtype=torch.bfloat16)
    offs = torch.empty(3, device="meta", dtype=torch.int32)
    h = torch.ops.ds_moe.bias_act(y, b, offs, _bias_act.GELU)
    dz, db = torch.ops.ds_moe.bias_act_backward(y, y, b, offs, _bias_act.GELU)
    assert h.shape == dz.shape == (10, 8) and db.shape == (3, 8)
    assert h.device.type == "meta" and db.dtype == torch.bfloat16
