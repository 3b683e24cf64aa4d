"""Triton kernels of the ``quantizer`` op (layout and rounding: see ``_quant_op``).

One program per block: it reads the block once (absmax and codes from the same registers) and
writes its codes and its scale, so quantize moves ``n * itemsize + n * bits / 8 + 4 n / block``
bytes and dequantize the reverse: the memory-bound minimum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ds_kernels._quant_op import QMAX, code_numel, num_blocks


def _warps(block: int) -> int:
    return 8 if block >= 2048 else 4


@triton.jit
def _quant8_kernel(x_ptr, q_ptr, s_ptr, n, nb, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = (pid // nb).to(tl.int64)
    blk = (pid % nb).to(tl.int64)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + row * n + offs, mask=mask, other=0.0).to(tl.float32)
    absmax = tl.max(tl.abs(x), axis=0)
    tl.store(s_ptr + pid, absmax / 127.0)
    inv = tl.where(absmax > 0, 127.0 / absmax, 0.0)
    q = tl.floor(x * inv + 0.5)
    q = tl.minimum(tl.maximum(q, -127.0), 127.0)
    tl.store(q_ptr + row * n + offs, q.to(tl.int8), mask=mask)


@triton.jit
def _quant4_kernel(x_ptr, q_ptr, s_ptr, n, c, nb, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = (pid // nb).to(tl.int64)
    blk = (pid % nb).to(tl.int64)
    half = tl.arange(0, BLOCK // 2)
    even = blk * BLOCK + 2 * half
    odd = even + 1
    base = x_ptr + row * n
    xe = tl.load(base + even, mask=even < n, other=0.0).to(tl.float32)
    xo = tl.load(base + odd, mask=odd < n, other=0.0).to(tl.float32)
    absmax = tl.maximum(tl.max(tl.abs(xe), axis=0), tl.max(tl.abs(xo), axis=0))
    tl.store(s_ptr + pid, absmax / 7.0)
    inv = tl.where(absmax > 0, 7.0 / absmax, 0.0)
    qe = tl.minimum(tl.maximum(tl.floor(xe * inv + 0.5), -7.0), 7.0).to(tl.int32)
    qo = tl.minimum(tl.maximum(tl.floor(xo * inv + 0.5), -7.0), 7.0).to(tl.int32)
    byte = (qe & 15) | ((qo & 15) << 4)
    bidx = blk * (BLOCK // 2) + half
    tl.store(q_ptr + row * c + bidx, byte.to(tl.uint8), mask=bidx < c)


@triton.jit
def _dequant8_kernel(q_ptr, s_ptr, out_ptr, n, nb, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = (pid // nb).to(tl.int64)
    blk = (pid % nb).to(tl.int64)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    q = tl.load(q_ptr + row * n + offs, mask=mask, other=0).to(tl.float32)
    scale = tl.load(s_ptr + pid)
    out = q * scale
    tl.store(out_ptr + row * n + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequant4_kernel(q_ptr, s_ptr, out_ptr, n, c, nb, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = (pid // nb).to(tl.int64)
    blk = (pid % nb).to(tl.int64)
    half = tl.arange(0, BLOCK // 2)
    bidx = blk * (BLOCK // 2) + half
    b = tl.load(q_ptr + row * c + bidx, mask=bidx < c, other=0).to(tl.int32)
    lo = ((b & 15) ^ 8) - 8
    hi = (((b >> 4) & 15) ^ 8) - 8
    scale = tl.load(s_ptr + pid)
    even = blk * BLOCK + 2 * half
    odd = even + 1
    base = out_ptr + row * n
    ty = out_ptr.dtype.element_ty
    tl.store(base + even, (lo.to(tl.float32) * scale).to(ty), mask=even < n)
    tl.store(base + odd, (hi.to(tl.float32) * scale).to(ty), mask=odd < n)


def quantize_rows(rows: torch.Tensor, bits: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a contiguous 2-D CUDA tensor row by row."""
    r, n = rows.shape
    nb = num_blocks(n, block)
    scales = torch.empty(r, nb, dtype=torch.float32, device=rows.device)
    grid = (r * nb,)
    assert bits in QMAX
    if bits == 8:
        codes = torch.empty(r, n, dtype=torch.int8, device=rows.device)
        _quant8_kernel[grid](rows, codes, scales, n, nb, BLOCK=block, num_warps=_warps(block))
    else:
        c = code_numel(n, 4)
        codes = torch.empty(r, c, dtype=torch.uint8, device=rows.device)
        _quant4_kernel[grid](rows, codes, scales, n, c, nb, BLOCK=block, num_warps=_warps(block))
    return codes, scales


def dequantize_rows(
    codes: torch.Tensor, scales: torch.Tensor, bits: int, block: int, n: int, dtype: torch.dtype
) -> torch.Tensor:
    """Dequantize a contiguous 2-D CUDA code tensor row by row into ``dtype``."""
    r, c = codes.shape
    nb = scales.shape[1]
    out = torch.empty(r, n, dtype=dtype, device=codes.device)
    grid = (r * nb,)
    if bits == 8:
        _dequant8_kernel[grid](codes, scales, out, n, nb, BLOCK=block, num_warps=_warps(block))
    else:
        _dequant4_kernel[grid](codes, scales, out, n, c, nb, BLOCK=block, num_warps=_warps(block))
    return out
