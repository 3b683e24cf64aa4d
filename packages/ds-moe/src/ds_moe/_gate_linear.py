"""The router's fp32 logits without an fp32 copy of the tokens (CUDA, Triton).

The router computes its logits in fp32 (``TopKGate``), as DeepSpeed does:
``F.linear(x.float(), w.float())``. With bf16 or fp16 tokens that widening writes an fp32 copy
of the whole [tokens, hidden] input, the GEMM reads it back, and autograd keeps it for the
weight gradient; the backward writes an fp32 input gradient and reads it again to narrow it.
At 16K tokens x 2048 that is about 805 MB (768 MiB) of memory traffic per layer and step,
and 128 MB of saved activations, for a GEMM with 8 output columns. The kernels
(``_gate_kernels``) widen in registers instead: the forward reads the tokens once and writes
the [tokens, experts] logits, the backward writes the input gradient once in the tokens' dtype
and reads the tokens once for the weight gradient, and autograd keeps the tokens themselves
(alive anyway).

Numbers: the products are exact in fp32 either way (the logits multiply the bf16/fp16
operands on the tensor cores, and a product of two such values is exact in fp32; the
gradients widen to fp32, ``input_precision="ieee"``, no TF32), and the sums are fp32
accumulations in another order than cuBLAS's fp32 GEMM: logits and gradients differ from the
unfused path in the last fp32 bits, which can flip a routing decision only where two experts'
logits tie to within that.

Opt-in, because on an H100 the layer is not reliably faster with it: 0.1.9 moved the logits'
dot to the tensor cores (0.064 ms instead of 0.21), and with 0.1.10's defaults the step is
1.005-1.025x the default for top-1 but 0.94-0.95x for top-2, although its kernels take 0.36 ms
less there and the host issues the step no slower (not understood yet):
``DS_MOE_FUSED_GATE=1`` (read on every forward) or ``TopKGate.fuse_logits = True`` turns it
on (``False`` keeps it off whatever the variable says). Even then it runs only where a probe (once per device and dtype) has checked the
compiled kernels against torch on CUDA, for bf16/fp16 tokens and a weight of the same dtype
without jitter; anything else keeps ``F.linear`` on fp32 copies. The kernels are
``torch.library`` ops (``ds_moe::gate_logits``, ``ds_moe::gate_logits_backward``) with meta
kernels.
"""

from __future__ import annotations

import functools
import importlib

import torch
from torch.autograd.function import once_differentiable

from ds_moe._triton_op import probe_on_cuda, register, requested

ENV_VAR = "DS_MOE_FUSED_GATE"

#: token dtypes the kernels take (fp32 tokens need no widening: F.linear is already one pass)
DTYPES = (torch.bfloat16, torch.float16)


def _kernels():
    # imported on first use: triton is optional, and importing it costs a second or so
    return importlib.import_module("ds_moe._gate_kernels")


# --------------------------------------------------------------------------- the ops
_LIB = torch.library.Library("ds_moe", "FRAGMENT")
_LIB.define("gate_logits(Tensor x, Tensor w) -> Tensor")
_LIB.define(
    "gate_logits_backward(Tensor grad, Tensor x, Tensor w, bool need_x, bool need_w) "
    "-> (Tensor, Tensor)"
)


def _forward(x, w):
    return _kernels().logits(x, w)


def _backward(grad, x, w, need_x, need_w):
    k = _kernels()
    dx = k.input_grad(grad, w, x.dtype) if need_x else x.new_empty(0)
    dw = k.weight_grad(grad, x, w.dtype) if need_w else w.new_empty(0)
    return dx, dw


def _meta_backward(grad, x, w, need_x, need_w):
    return (torch.empty_like(x) if need_x else x.new_empty(0),
            torch.empty_like(w) if need_w else w.new_empty(0))  # fmt: skip


def _meta_forward(x, w):
    return torch.empty(x.shape[0], w.shape[0], device=x.device, dtype=torch.float32)


register(_LIB, "gate_logits", _forward, _meta_forward, _kernels)
register(_LIB, "gate_logits_backward", _backward, _meta_backward, _kernels)


class _GateLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return torch.ops.ds_moe.gate_logits(x, w)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad
        dx, dw = torch.ops.ds_moe.gate_logits_backward(grad.contiguous(), x, w, need_x, need_w)
        return (dx if need_x else None), (dw if need_w else None)


def gate_logits(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``F.linear(x.float(), w.float())`` for ``x`` [S, H] and ``w`` [E, H] of one dtype."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return _GateLogits.apply(x, w.contiguous())


def reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The unfused router logits: fp32 copies, then ``F.linear``."""
    return torch.nn.functional.linear(x.float(), w.float())


# --------------------------------------------------------------------------- the probe
@functools.cache
def _probe(device_type: str, device_index: int | None, dtype: torch.dtype) -> bool:
    if dtype not in DTYPES:
        return False  # fp32 tokens keep F.linear (no widening to save)
    device = torch.device(device_type, device_index)
    return probe_on_cuda(device_type, lambda: _self_check(device, dtype))


def _self_check(device: torch.device, dtype: torch.dtype) -> bool:
    """The compiled kernels against torch: ragged token, hidden and expert tiles, a weight
    gradient summed over two splits."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(600, 200, device=device, generator=g).to(dtype)
    w = (torch.randn(6, 200, device=device, generator=g) * 0.1).to(dtype)
    up = torch.randn(600, 6, device=device, generator=g)
    xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = gate_logits(xf, wf)
    out.backward(up)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = reference(xr, wr)
    ref.backward(up)
    one_ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    return bool(
        out.dtype == torch.float32
        and torch.allclose(out, ref, rtol=1e-5, atol=1e-4)
        and torch.allclose(xf.grad.float(), xr.grad.float(), rtol=one_ulp, atol=1e-5)
        and torch.allclose(wf.grad.float(), wr.grad.float(), rtol=one_ulp, atol=1e-3)
    )


def fused_gate_available(device: torch.device, dtype: torch.dtype) -> bool:
    """True where the kernels can run (and passed the probe) for this device and dtype."""
    return _probe(device.type, device.index, dtype)


def fused_gate_requested(flag: bool | None) -> bool:
    """Whether the fused logits are asked for: ``flag`` (``TopKGate.fuse_logits``) when set,
    else ``DS_MOE_FUSED_GATE=1`` (off by default: measured slower on an H100)."""
    return requested(flag, ENV_VAR)
