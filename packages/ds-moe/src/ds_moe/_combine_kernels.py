"""Triton kernels of the top-k layer's token gathers (see ``_combine``).

Two kernels over the expert buffer ``y`` [1 + S*k, d] and the tokens [S, d]:

- gather-sum: ``out[s] = sum_j w[s, j] * src[index[s, j]]`` (``w`` optional), one pass: reads
  the k rows of each token and writes one; each program a tile of ``BLOCK_T`` tokens x
  ``BLOCK_D`` columns. The combine's forward (with the weights) and the permutation's backward
  for k > 1 (without);
- combine backward, token-major over full rows: for each token and choice, the expert row's
  gradient ``grad_y[dest[s, j]] = w[s, j] * grad_out[s]`` (``dest`` covers every buffer row
  1..S*k once, dead rows with weight 0; the program of the first tokens zeroes the sentinel
  row 0) and the weight's gradient ``dot(y[index[s, j]], grad_out[s])``, reading each
  ``grad_out`` tile once for all k choices.

Numbers: the weight is rounded to the storage dtype first (the unfused path multiplies by
``weight.to(y.dtype)``), the products are formed in fp32 (exact for bf16/fp16 operands) and
summed in fp32 from the first choice on, and each result is rounded once to the storage dtype.
So for k <= 2 the outputs equal the unfused ``index_select`` + multiply / ``bmm`` / ``sum``
(cuBLAS and torch also sum two exact fp32 products with one rounding); for k > 2 only the
order of the fp32 sums may differ. The weight gradient is an fp32 dot in tile order, rounded to
the storage dtype as the unfused ``bmm`` rounds it (so within one ulp of it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ds_moe._bias_act_kernels import INTERPRET, _round

#: gather-sum tile: tokens x columns per program
BLOCK_T = 16
BLOCK_D = 256
GATHER_WARPS = 4
#: combine backward: tokens per program, and the columns of one step along the row
BWD_BLOCK_T = 16
BWD_BLOCK_D = 128
BWD_WARPS = 4


@triton.jit
def _gather_sum_kernel(src_ptr, idx_ptr, w_ptr, out_ptr, S, D, stride_src, stride_out,
                       K: tl.constexpr, HAS_W: tl.constexpr, INTERP: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = toks < S
    ok = t_ok[:, None] & (cols < D)[None, :]
    dtype = out_ptr.dtype.element_ty
    # the first choice starts the sum (not 0 + it: a -0.0 product stays -0.0, as unfused)
    r = tl.load(idx_ptr + toks * K, mask=t_ok, other=0)
    acc = tl.load(src_ptr + r[:, None] * stride_src + cols[None, :], mask=ok, other=0.0)
    acc = acc.to(tl.float32)
    if HAS_W:
        w = _round(tl.load(w_ptr + toks * K, mask=t_ok, other=0.0), dtype, INTERP)
        acc = acc * w.to(tl.float32)[:, None]
    for j in tl.static_range(1, K):
        r = tl.load(idx_ptr + toks * K + j, mask=t_ok, other=0)
        v = tl.load(src_ptr + r[:, None] * stride_src + cols[None, :], mask=ok, other=0.0)
        v = v.to(tl.float32)
        if HAS_W:
            w = _round(tl.load(w_ptr + toks * K + j, mask=t_ok, other=0.0), dtype, INTERP)
            v = v * w.to(tl.float32)[:, None]
        acc = acc + v
    out = out_ptr + toks[:, None].to(tl.int64) * stride_out + cols[None, :]
    tl.store(out, _round(acc, dtype, INTERP), mask=ok)


@triton.jit
def _combine_bwd_kernel(gout_ptr, y_ptr, w_ptr, idx_ptr, dest_ptr, gy_ptr, gw_ptr, S, D,
                        stride_g, stride_y, stride_gy, K: tl.constexpr, K_PAD: tl.constexpr,
                        NEED_W: tl.constexpr, INTERP: tl.constexpr, BLOCK_T: tl.constexpr,
                        BLOCK_D: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    toks = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = toks < S
    jj = tl.arange(0, K_PAD)
    dtype = gy_ptr.dtype.element_ty
    dots = tl.zeros((BLOCK_T, K_PAD), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        ok = t_ok[:, None] & (cols < D)[None, :]
        g = tl.load(gout_ptr + toks[:, None].to(tl.int64) * stride_g + cols[None, :], mask=ok,
                    other=0.0).to(tl.float32)  # fmt: skip
        for j in tl.static_range(K):
            w = _round(tl.load(w_ptr + toks * K + j, mask=t_ok, other=0.0), dtype, INTERP)
            dest = tl.load(dest_ptr + toks * K + j, mask=t_ok, other=0)
            gy = _round(g * w.to(tl.float32)[:, None], dtype, INTERP)
            tl.store(gy_ptr + dest[:, None] * stride_gy + cols[None, :], gy, mask=ok)
            if NEED_W:
                r = tl.load(idx_ptr + toks * K + j, mask=t_ok, other=0)
                yv = tl.load(y_ptr + r[:, None] * stride_y + cols[None, :], mask=ok, other=0.0)
                part = tl.sum(yv.to(tl.float32) * g, axis=1)
                dots += tl.where(jj[None, :] == j, part[:, None], 0.0)
    if pid == 0:  # the sentinel row 0: its gradient is exactly zero (it stands for drops)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            tl.store(gy_ptr + cols, tl.zeros((BLOCK_D,), dtype=dtype), mask=cols < D)
    if NEED_W:
        gw = _round(dots, dtype, INTERP).to(tl.float32)
        gw_ok = t_ok[:, None] & (jj < K)[None, :]
        tl.store(gw_ptr + toks[:, None] * K + jj[None, :], gw, mask=gw_ok)


def gather_sum(src: torch.Tensor, index: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """``out[s] = sum_j weight[s, j] * src[index[s, j]]`` for ``index`` [S, k] (int64)."""
    num_tokens, k = index.shape
    d = src.shape[1]
    index = index.contiguous()  # the kernel reads it as [S, k] row-major
    weight = weight.contiguous() if weight is not None else None
    src = src if src.stride(1) == 1 else src.contiguous()
    out = torch.empty(num_tokens, d, device=src.device, dtype=src.dtype)
    if num_tokens == 0 or d == 0:
        return out
    grid = (triton.cdiv(num_tokens, BLOCK_T), triton.cdiv(d, BLOCK_D))
    _gather_sum_kernel[grid](
        src, index, weight if weight is not None else index, out, num_tokens, d,
        src.stride(0), out.stride(0), K=k, HAS_W=weight is not None, INTERP=INTERPRET,
        BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, num_warps=GATHER_WARPS,
    )  # fmt: skip
    return out


def combine_backward(
    grad_out: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    index: torch.Tensor,
    dest: torch.Tensor,
    need_w: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The expert buffer's gradient [rows, d] and the weights' [S, k] (fp32; empty if not
    ``need_w``)."""
    num_tokens, k = index.shape
    d = grad_out.shape[1]
    # the kernel reads [S, k] tensors row-major and rows with unit column stride
    index, dest, weight = index.contiguous(), dest.contiguous(), weight.contiguous()
    grad_out = grad_out if grad_out.stride(1) == 1 else grad_out.contiguous()
    y = y if y.stride(1) == 1 else y.contiguous()
    grad_y = torch.empty(y.shape[0], d, device=y.device, dtype=y.dtype)
    grad_w = torch.empty(num_tokens if need_w else 0, k, device=y.device, dtype=torch.float32)
    if d == 0:
        return grad_y, grad_w
    grid = (max(triton.cdiv(num_tokens, BWD_BLOCK_T), 1),)  # one program zeroes the sentinel
    _combine_bwd_kernel[grid](
        grad_out, y, weight, index, dest, grad_y, grad_w, num_tokens, d, grad_out.stride(0),
        y.stride(0), grad_y.stride(0), K=k, K_PAD=max(2, triton.next_power_of_2(k)), NEED_W=need_w,
        INTERP=INTERPRET, BLOCK_T=BWD_BLOCK_T, BLOCK_D=BWD_BLOCK_D, num_warps=BWD_WARPS,
    )  # fmt: skip
    return grad_y, grad_w
