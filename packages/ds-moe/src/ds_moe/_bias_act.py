"""Fused per-expert bias add + activation of the grouped experts' first layer (CUDA, Triton).

Unfused, ``h = act(x @ w1[g].T + b1[g])`` costs three passes over the [rows, ffn] tensor after
the GEMM writes ``y``: the bias add reads and writes it (in place), the activation reads it
and writes ``h``; the backward reads ``dh`` and ``z``, writes ``dz``, and the per-expert bias
gradient reads ``dz`` again. Fused (``_bias_act_kernels``), the forward reads ``y`` and writes
``h`` (one read and one write fewer), and the backward reads ``dh`` and ``y``, writes ``dz``
and sums it per expert in the same pass (one read fewer). It keeps ``y``, not ``z``, for the
backward (the unfused path keeps ``z``: the same memory) and recomputes ``z = y + b``.

Numbers: the kernels round ``y + b`` to the storage dtype before the activation, as the
unfused in-place add does, and use torch's fp32 formulas, so the output and ``dz`` match the
unfused path up to the last bit of the transcendental functions (1 ulp of the storage dtype at
most); the bias gradient sums the same rounded ``dz`` in fp32 in another order (1 ulp).

On by default (on an H100, 16 x 128 tiles: forward + backward 1.25x the unfused passes, and
the layer step 1.02-1.05x the unfused one in every A/B): ``DS_MOE_FUSED_BIAS_ACT=0`` (read on
every forward) or ``GroupedMLPExperts.fuse_bias_act = False`` turns it off (``True`` keeps it
on whatever the variable says). It runs only where a probe (once per device, dtype and
activation, like the grouped-GEMM probe) has checked the compiled kernels against torch on
CUDA; anything else keeps the unfused code. The kernels are ``torch.library`` ops
(``ds_moe::bias_act``, ``ds_moe::bias_act_backward``) with meta kernels, so profilers name
them and ``moe_phases.py`` counts their bytes on the ``meta`` device.
"""

from __future__ import annotations

import functools
import importlib

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ds_moe._triton_op import probe_on_cuda, register, requested

ENV_VAR = "DS_MOE_FUSED_BIAS_ACT"

#: the kernels' ACT codes
RELU, GELU, GELU_TANH, SILU = 0, 1, 2, 3


def activation_code(act: nn.Module) -> int | None:
    """The kernels' code for ``act``, or None (exact types: a subclass may change forward)."""
    kind = type(act)
    if kind is nn.ReLU:
        return RELU
    if kind is nn.SiLU:
        return SILU
    if kind is nn.GELU:
        return {"none": GELU, "tanh": GELU_TANH}.get(act.approximate)
    return None


def _kernels():
    # imported on first use: triton is optional, and importing it costs a second or so
    return importlib.import_module("ds_moe._bias_act_kernels")


# --------------------------------------------------------------------------- the ops
_LIB = torch.library.Library("ds_moe", "FRAGMENT")
_LIB.define("bias_act(Tensor y, Tensor bias, Tensor offs, int act) -> Tensor")
_LIB.define(
    "bias_act_backward(Tensor grad, Tensor y, Tensor bias, Tensor offs, int act) "
    "-> (Tensor, Tensor)"
)


register(_LIB, "bias_act", lambda *a: _kernels().forward(*a),
         lambda y, b, o, a: torch.empty_like(y), _kernels)  # fmt: skip
register(_LIB, "bias_act_backward", lambda *a: _kernels().backward(*a),
         lambda g, y, b, o, a: (torch.empty_like(y), torch.empty_like(b)), _kernels)  # fmt: skip


class _BiasAct(torch.autograd.Function):
    """``act(y + bias[group of row])``; rows past ``offs[-1]`` are left undefined."""

    @staticmethod
    def forward(ctx, y, bias, offs, act):
        ctx.save_for_backward(y, bias, offs)
        ctx.act = act
        return torch.ops.ds_moe.bias_act(y, bias, offs, act)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        y, bias, offs = ctx.saved_tensors
        dz, db = torch.ops.ds_moe.bias_act_backward(grad.contiguous(), y, bias, offs, ctx.act)
        return dz, db, None, None


def bias_act(y: torch.Tensor, bias: torch.Tensor, offs: torch.Tensor, act: int) -> torch.Tensor:
    """``h[r] = act(y[r] + bias[g])`` for the rows r of group g (int32 ends ``offs``)."""
    if y.stride(-1) != 1:
        y = y.contiguous()
    return _BiasAct.apply(y, bias.contiguous(), offs.contiguous(), act)


# --------------------------------------------------------------------------- the probe
def reference(
    y: torch.Tensor, bias: torch.Tensor, offs: torch.Tensor, act: nn.Module
) -> torch.Tensor:
    """The unfused math in plain torch: per-row bias in the storage dtype, then ``act``."""
    rows = torch.arange(y.shape[0], device=y.device, dtype=offs.dtype)
    group = torch.searchsorted(offs, rows, right=True).clamp(max=offs.numel() - 1)
    return act(y + bias[group])


@functools.cache
def _probe(device_type: str, device_index: int | None, dtype: torch.dtype, act: int) -> bool:
    device = torch.device(device_type, device_index)
    return probe_on_cuda(device_type, lambda: _self_check(device, dtype, act))


def _module(act: int) -> nn.Module:
    """The torch module of an ACT code (the probe's reference)."""
    return {RELU: nn.ReLU, GELU: nn.GELU, GELU_TANH: lambda: nn.GELU("tanh"), SILU: nn.SiLU}[act]()


def _self_check(device: torch.device, dtype: torch.dtype, act: int) -> bool:
    """The compiled kernels against torch: two row tiles, a ragged last column tile, an
    empty group and rows past the last group (whose NaNs must reach no kept value)."""
    g = torch.Generator(device=device).manual_seed(0)
    y = torch.randn(130, 40, device=device, generator=g).to(dtype)
    y[120:] = float("nan")
    bias = torch.randn(3, 40, device=device, generator=g).to(dtype)
    offs = torch.tensor([50, 50, 120], device=device, dtype=torch.int32)
    dh = torch.randn(130, 40, device=device, generator=g).to(dtype)
    dh[120:] = float("nan")
    yf, bf = y.clone().requires_grad_(), bias.clone().requires_grad_()
    h = bias_act(yf, bf, offs, act)
    h.backward(dh)
    yr = y[:120].clone().requires_grad_()
    ref = reference(yr, bias, offs, _module(act))
    ref.backward(dh[:120])
    group = torch.searchsorted(
        offs, torch.arange(120, device=device, dtype=torch.int32), right=True
    )
    db = torch.zeros(3, 40, device=device).index_add_(0, group, yr.grad.float())
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    return bool(
        torch.allclose(h[:120].float(), ref.float(), **tol)
        and torch.allclose(yf.grad[:120].float(), yr.grad.float(), **tol)
        and torch.allclose(bf.grad.float(), db, **tol)
    )


def fused_bias_act_available(device: torch.device, dtype: torch.dtype, act: int) -> bool:
    """True where the fused kernels can run (and passed the probe) for this device and dtype."""
    return _probe(device.type, device.index, dtype, act)


def fused_bias_act_requested(flag: bool | None) -> bool:
    """Whether the fused path is asked for: ``flag`` (``GroupedMLPExperts.fuse_bias_act``)
    when set, else ``DS_MOE_FUSED_BIAS_ACT`` (``0`` off, ``1`` on), else on: measured faster on
    an H100 (see the module's docstring)."""
    return requested(flag, ENV_VAR, default=True)


def fused_code(activation: nn.Module, bias: torch.Tensor | None, x: torch.Tensor) -> int | None:
    """The ACT code if ``activation(grouped GEMM + bias)`` of ``x`` runs fused, else None."""
    if bias is None or bias.dtype != x.dtype:
        return None  # no bias: the activation alone is one pass already
    act = activation_code(activation)
    if act is None or not fused_bias_act_available(x.device, x.dtype, act):
        return None
    return act
