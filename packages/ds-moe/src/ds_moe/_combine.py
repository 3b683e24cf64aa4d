"""Fused token gathers of the top-k layer on one rank (CUDA, Triton): the combine and the
permutation's backward, each one pass (``_combine_kernels``).

Unfused (``_local_dispatch``), the combine's forward gathers the k expert rows of every token
into a [S, k, d] copy and reduces it with a batched [1 x k] @ [k x d] product (for k = 1 a
multiply), which cuBLAS runs as 16K tiny GEMMs; it keeps the copy for the backward, whose
weight gradient is another batched product and whose row gradient is a gather then a
multiply. The permutation's backward (k > 1) gathers [S, k, d] and then sums it. Fused:

- combine forward: reads the k rows of each token, writes its output (no copy kept: the
  backward reads the expert buffer ``y`` itself, alive anyway);
- combine backward: one token-major pass reads ``grad_out`` once, writes every buffer row's
  gradient and computes the weights' gradient from the same tile;
- permutation backward (k > 1): reads each token's k row gradients, writes their sum.

At the benchmark's top-2 shape (16,384 tokens, d = 2048, bf16) that is 192 + 320 + 192 MiB of
memory traffic against about 450 + 700 + 450 MiB and ~15 launches unfused.

Numbers: the same products and roundings as the unfused path (``_combine_kernels``): outputs
and row gradients are equal to it for k <= 2; the weights' gradient (rounded to the storage
dtype, as unfused) may differ in its last bit, since its fp32 dot sums in another order.

On an H100 at the benchmark's shape the layer step is 1.05-1.07x faster with them (top-1
and top-2). On by default where a probe (once per device and dtype) has checked the compiled
kernels against the unfused path on CUDA, for bf16 and fp16 buffers: ``DS_MOE_FUSED_COMBINE=0`` (read
on every forward) or ``MoE.fuse_combine = False`` keeps the unfused gathers. The kernels are
``torch.library`` ops (``ds_moe::gather_sum``, ``ds_moe::combine_backward``) with meta kernels.
"""

from __future__ import annotations

import functools
import importlib

import torch
from torch.autograd.function import once_differentiable

from ds_moe._triton_op import probe_on_cuda, register, requested

ENV_VAR = "DS_MOE_FUSED_COMBINE"

#: buffer dtypes the kernels take (their products are exact in fp32)
DTYPES = (torch.bfloat16, torch.float16)


def _kernels():
    # imported on first use: triton is optional, and importing it costs a second or so
    return importlib.import_module("ds_moe._combine_kernels")


# --------------------------------------------------------------------------- the ops
_LIB = torch.library.Library("ds_moe", "FRAGMENT")
_LIB.define("gather_sum(Tensor src, Tensor index, Tensor? weight) -> Tensor")
_LIB.define(
    "combine_backward(Tensor grad_out, Tensor y, Tensor weight, Tensor index, Tensor dest, "
    "bool need_w) -> (Tensor, Tensor)"
)


def _meta_gather_sum(src, index, weight):
    return src.new_empty(index.shape[0], src.shape[1])


def _meta_backward(grad_out, y, weight, index, dest, need_w):
    rows = index.shape[0] if need_w else 0
    return torch.empty_like(y), weight.new_empty(rows, index.shape[1], dtype=torch.float32)


register(_LIB, "gather_sum", lambda *a: _kernels().gather_sum(*a), _meta_gather_sum, _kernels)
register(_LIB, "combine_backward", lambda *a: _kernels().combine_backward(*a), _meta_backward,
         _kernels)  # fmt: skip


class _FusedCombine(torch.autograd.Function):
    """``out[s] = sum_j weight[s, j] * y[row[s, j]]``; ``dest[s, j]`` is the buffer row of
    choice j of token s whether kept or dropped (``weight`` is 0 for a dropped one, whose
    ``row`` is the sentinel 0), so the backward writes every buffer row but the sentinel."""

    @staticmethod
    def forward(ctx, y, weight, row, dest):
        ctx.save_for_backward(y, weight, row, dest)
        return torch.ops.ds_moe.gather_sum(y, row, weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        y, weight, row, dest = ctx.saved_tensors
        need_w = ctx.needs_input_grad[1]
        grad_y, grad_w = torch.ops.ds_moe.combine_backward(
            grad_out.contiguous(), y, weight, row, dest, need_w
        )
        return grad_y, (grad_w if need_w else None), None, None


class _FusedPermute(torch.autograd.Function):
    """``buf = x[token_of_row]``; the backward sums each token's k row gradients in one pass."""

    @staticmethod
    def forward(ctx, x, token_of_row, row):
        ctx.save_for_backward(row)
        return x.index_select(0, token_of_row)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_buf):
        (row,) = ctx.saved_tensors
        return torch.ops.ds_moe.gather_sum(grad_buf.contiguous(), row, None), None, None


def fused_combine(
    y: torch.Tensor, weight: torch.Tensor, row: torch.Tensor, dest: torch.Tensor
) -> torch.Tensor:
    """The per-token output [S, d] of expert buffer ``y`` (weights [S, k] fp32, zero where
    dropped; ``row``/``dest`` [S, k] int64)."""
    return _FusedCombine.apply(y, weight, row, dest)  # the kernels' wrappers fix layouts


def fused_permute(x: torch.Tensor, token_of_row: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """The expert buffer ``x[token_of_row]``; its backward sums the rows ``row`` [S, k]."""
    return _FusedPermute.apply(x, token_of_row, row)


# --------------------------------------------------------------------------- the probe
@functools.cache
def _probe(device_type: str, device_index: int | None, dtype: torch.dtype) -> bool:
    if dtype not in DTYPES:
        return False
    device = torch.device(device_type, device_index)
    return probe_on_cuda(device_type, lambda: _self_check(device, dtype))


def _self_check(device: torch.device, dtype: torch.dtype) -> bool:
    """The compiled kernels against the unfused gathers: k = 1, 2, 3, ragged token and column
    tiles, dropped choices, NaN in the dead rows."""
    for k in (1, 2, 3):
        diff = compare_with_unfused(device, dtype, k)
        exact = k <= 2  # more than two fp32 products may be summed in another order
        if not (diff["bitwise_equal"] or not exact) or diff["max_rel"] > 2.0**-6:
            return False
    return True


def compare_with_unfused(
    device: torch.device, dtype: torch.dtype, k: int, num_tokens: int = 37, d: int = 300
) -> dict:
    """One forward + backward of permute -> expert stand-in -> combine, fused and unfused, on a
    routing that drops choices (capacity 3/4 of an even load), with NaN in the buffer's dead
    rows (which the grouped GEMM leaves undefined). Returns ``bitwise_equal`` (output, token
    gradient and expert-row gradient) and ``max_rel`` (every result, the logits' gradient
    included, relative to its largest value)."""
    from ds_moe._local_dispatch import combine, local_layout, permute
    from ds_moe._routing import capacity, route

    experts = 4
    g = torch.Generator(device=device).manual_seed(k)
    logits0 = torch.randn(num_tokens, experts, device=device, generator=g)
    x0 = torch.randn(num_tokens, d, device=device, generator=g).to(dtype)
    scale = torch.randn(1 + num_tokens * k, d, device=device, generator=g).to(dtype)
    up = torch.randn(num_tokens, d, device=device, generator=g).to(dtype)
    slots = capacity(num_tokens, experts, k, 0.75, 1)
    results = []
    for fused in (False, True):
        logits = logits0.clone().requires_grad_()
        x = x0.clone().requires_grad_()
        routing = route(logits, k, capacity_slots=slots)
        layout = local_layout(routing)
        buf = permute(x, layout, fused=fused)
        y = buf * scale  # a stand-in expert: a different function of every row
        y.retain_grad()
        live = torch.arange(y.shape[0], device=device) < layout.offs[-1]
        out = combine(torch.where(live[:, None], y, float("nan")), routing, layout, fused=fused)
        out.backward(up)
        results.append((out, x.grad, y.grad, logits.grad))
    (a, b) = results
    bitwise = all(torch.equal(u, v) for u, v in zip(a[:3], b[:3]))
    max_rel = max(
        ((u.float() - v.float()).abs().max() / v.float().abs().max().clamp(min=1e-30)).item()
        for u, v in zip(a, b)
    )
    return {"bitwise_equal": bitwise, "max_rel": max_rel}


def fused_combine_available(device: torch.device, dtype: torch.dtype) -> bool:
    """True where the kernels can run (and passed the probe) for this device and dtype."""
    return _probe(device.type, device.index, dtype)


def fused_combine_requested(flag: bool | None) -> bool:
    """Whether the fused gathers are asked for: ``flag`` (``MoE.fuse_combine``) when set, else
    ``DS_MOE_FUSED_COMBINE`` (``0`` off, ``1`` on), else on."""
    return requested(flag, ENV_VAR, default=True)
