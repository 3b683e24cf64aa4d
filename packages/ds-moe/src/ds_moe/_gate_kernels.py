"""Triton kernels of the router's fp32 logits read straight from bf16/fp16 tokens (see
``_gate_linear``).

Three kernels, each one pass over the [tokens, hidden] tensor it touches:

- logits: ``x[S, H] @ w[E, H].T`` on the tensor cores in the operands' own dtype (bf16 or
  fp16, the same for both: ``_gate_linear`` checks) with fp32 accumulation, written as fp32
  [S, E]. A product of two bf16 (8-bit significand) or two fp16 (11-bit) values is exact in
  fp32, so this computes the fp32 GEMM's products exactly, as widening both operands first
  would, without fp32 FMA dot code (5x slower on an H100: 0.21 ms at 16,384 x 2,048);
- input gradient: ``g[S, E] @ w`` in fp32, rounded once to the tokens' dtype as it is stored;
- weight gradient: ``g.T @ x`` in fp32 per split of the tokens, into an fp32 partial buffer
  [splits, E, H] that torch sums in a fixed order (no atomics: deterministic).

The expert axis is padded to at least 16 (``tl.dot``'s smallest tile) with masked loads.
``INTERP``: under TRITON_INTERPRET=1 (the CPU tests) the rounding to bf16 is done on the bits,
as in ``_bias_act_kernels`` (the interpreter truncates), and the logits widen both operands to
fp32 before their dot (the interpreter cannot multiply bf16): the same exact products, so the
CPU tests check the values the GPU path computes, but not its tensor-core code (the GPU tests
do).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ds_moe._bias_act_kernels import INTERPRET, _round

#: tokens per program of the logits and input-gradient kernels
BLOCK_S = 64
#: hidden columns per step (logits) or per program (gradients)
BLOCK_H = 128
#: tokens per program of the weight-gradient kernel (each sums its rows in fp32), and the
#: tokens per step inside it: 256 and 32 ran in 0.090 ms on an H100 for 16,384 x 2,048 tokens
#: and 8 experts, against 0.13 ms at 512 and 64 (``gate_logits_bench.py --sweep``)
ROWS_PER_SPLIT = 256
WG_BLOCK_S = 32


def expert_pad(e: int) -> int:
    return max(16, triton.next_power_of_2(e))


@triton.jit
def _logits_kernel(x_ptr, w_ptr, out_ptr, S, H, E, stride_x, stride_w, stride_o,
                   E_PAD: tl.constexpr, INTERP: tl.constexpr, BLOCK_S: tl.constexpr,
                   BLOCK_H: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    es = tl.arange(0, E_PAD)
    row_ok = rows < S
    acc = tl.zeros((BLOCK_S, E_PAD), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_ok = hs < H
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + hs[None, :],
                    mask=row_ok[:, None] & h_ok[None, :], other=0.0)  # fmt: skip
        w = tl.load(w_ptr + es[None, :] * stride_w + hs[:, None],
                    mask=(es[None, :] < E) & h_ok[:, None], other=0.0)  # fmt: skip
        if INTERP:
            # the interpreter keeps bf16 as raw bits, which its dot cannot multiply: widen
            # (the same exact products)
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            # exact products (see the module docstring), fp32 sums
            acc = tl.dot(x, w.to(x.dtype), acc, out_dtype=tl.float32)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_o + es[None, :], acc,
             mask=row_ok[:, None] & (es[None, :] < E))  # fmt: skip


@triton.jit
def _input_grad_kernel(g_ptr, w_ptr, dx_ptr, S, H, E, stride_g, stride_w, stride_dx,
                       E_PAD: tl.constexpr, INTERP: tl.constexpr, BLOCK_S: tl.constexpr,
                       BLOCK_H: tl.constexpr):  # fmt: skip
    n_h = tl.cdiv(H, BLOCK_H)
    pid = tl.program_id(0)
    rows = (pid // n_h) * BLOCK_S + tl.arange(0, BLOCK_S)
    hs = (pid % n_h) * BLOCK_H + tl.arange(0, BLOCK_H)
    es = tl.arange(0, E_PAD)
    row_ok, h_ok, e_ok = rows < S, hs < H, es < E
    g = tl.load(g_ptr + rows[:, None].to(tl.int64) * stride_g + es[None, :],
                mask=row_ok[:, None] & e_ok[None, :], other=0.0)  # fmt: skip
    w = tl.load(w_ptr + es[:, None] * stride_w + hs[None, :],
                mask=e_ok[:, None] & h_ok[None, :], other=0.0)  # fmt: skip
    dx = tl.dot(g, w.to(tl.float32), input_precision="ieee")
    tl.store(dx_ptr + rows[:, None].to(tl.int64) * stride_dx + hs[None, :],
             _round(dx, dx_ptr.dtype.element_ty, INTERP), mask=row_ok[:, None] & h_ok[None, :])  # fmt: skip


@triton.jit
def _weight_grad_kernel(g_ptr, x_ptr, part_ptr, S, H, E, stride_g, stride_x,
                        E_PAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_S: tl.constexpr,
                        BLOCK_H: tl.constexpr):  # fmt: skip
    n_h = tl.cdiv(H, BLOCK_H)
    pid = tl.program_id(0)
    split = pid // n_h
    hs = (pid % n_h) * BLOCK_H + tl.arange(0, BLOCK_H)
    es = tl.arange(0, E_PAD)
    h_ok, e_ok = hs < H, es < E
    acc = tl.zeros((E_PAD, BLOCK_H), dtype=tl.float32)
    for s0 in range(0, ROWS, BLOCK_S):
        rows = split * ROWS + s0 + tl.arange(0, BLOCK_S)
        row_ok = rows < S
        g = tl.load(g_ptr + rows[:, None].to(tl.int64) * stride_g + es[None, :],
                    mask=row_ok[:, None] & e_ok[None, :], other=0.0)  # fmt: skip
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + hs[None, :],
                    mask=row_ok[:, None] & h_ok[None, :], other=0.0)  # fmt: skip
        acc = tl.dot(tl.trans(g), x.to(tl.float32), acc, input_precision="ieee")
    # the partial of every (split, expert, column), padded experts included: the buffer is
    # [splits, E_PAD, H], so no entry is left unwritten
    base = split.to(tl.int64) * E_PAD * H
    tl.store(part_ptr + base + es[:, None] * H + hs[None, :], acc, mask=h_ok[None, :])


# Each launch below takes ``block_s``/``block_h`` (and ``rows`` for the weight gradient)
# overrides of the module's block sizes, read when called (None: the constant above, so that
# tests can shrink them): ``benchmarks/moe/gate_logits_bench.py --sweep`` times
# other shapes with them. Every shape runs the same fp32 products and sums per output, except
# that the weight gradient's split size (``rows``) changes which rows each partial sums.


def logits(
    x: torch.Tensor, w: torch.Tensor, block_s: int | None = None, block_h: int | None = None
) -> torch.Tensor:
    block_s, block_h = block_s or BLOCK_S, block_h or BLOCK_H
    s, h = x.shape
    e = w.shape[0]
    out = torch.empty(s, e, device=x.device, dtype=torch.float32)
    if s == 0:
        return out
    _logits_kernel[(triton.cdiv(s, block_s),)](
        x, w, out, s, h, e, x.stride(0), w.stride(0), out.stride(0),
        E_PAD=expert_pad(e), INTERP=INTERPRET, BLOCK_S=block_s, BLOCK_H=block_h, num_warps=4,
    )  # fmt: skip
    return out


def input_grad(
    g: torch.Tensor,
    w: torch.Tensor,
    dtype: torch.dtype,
    block_s: int | None = None,
    block_h: int | None = None,
) -> torch.Tensor:
    block_s, block_h = block_s or BLOCK_S, block_h or BLOCK_H
    s, e = g.shape
    h = w.shape[1]
    dx = torch.empty(s, h, device=g.device, dtype=dtype)
    if s == 0:
        return dx
    grid = (triton.cdiv(s, block_s) * triton.cdiv(h, block_h),)
    _input_grad_kernel[grid](
        g, w, dx, s, h, e, g.stride(0), w.stride(0), dx.stride(0),
        E_PAD=expert_pad(e), INTERP=INTERPRET, BLOCK_S=block_s, BLOCK_H=block_h, num_warps=4,
    )  # fmt: skip
    return dx


def weight_grad(
    g: torch.Tensor,
    x: torch.Tensor,
    dtype: torch.dtype,
    block_s: int | None = None,
    block_h: int | None = None,
    rows: int | None = None,
) -> torch.Tensor:
    block_s, block_h, rows = block_s or WG_BLOCK_S, block_h or BLOCK_H, rows or ROWS_PER_SPLIT
    if rows % block_s:
        raise ValueError(f"weight_grad: rows={rows} is not a multiple of block_s={block_s}")
    s, e = g.shape
    h = x.shape[1]
    if s == 0:
        return torch.zeros(e, h, device=g.device, dtype=dtype)
    splits = triton.cdiv(s, rows)
    pad = expert_pad(e)
    part = torch.empty(splits, pad, h, device=g.device, dtype=torch.float32)
    grid = (splits * triton.cdiv(h, block_h),)
    _weight_grad_kernel[grid](
        g, x, part, s, h, e, g.stride(0), x.stride(0),
        E_PAD=pad, ROWS=rows, BLOCK_S=block_s, BLOCK_H=block_h, num_warps=4,
    )  # fmt: skip
    # a fixed-order sum over the splits, then one rounding to the weight's dtype (the
    # unfused path rounds its fp32 weight gradient once too, in the widening's backward)
    return part[:, :e].sum(dim=0).to(dtype)
