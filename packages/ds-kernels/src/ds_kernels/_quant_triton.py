"""Triton kernels of the ``quantizer`` op (layout and rounding: see ``_quant_op``).

Each program quantizes a tile of ``BPP`` consecutive blocks of one row (``BPP * BLOCK`` values,
about 4096), read once: absmax per block and the codes from the same registers, then its codes
and scales written. So quantize moves ``n * itemsize + n * bits / 8 + 4 n / block`` bytes and
dequantize the reverse: the memory-bound minimum.

Why tiles and not one program per block: with the gradient blocks of qgZ (a few hundred values)
one program per block gives each thread two values, a few bytes per memory instruction and a
block-wide reduction per few hundred bytes. A tile keeps every thread on 16-byte accesses
whatever the block size. int4 values are read and written as one contiguous tile too and split
into even/odd nibbles in registers (``tl.split``/``tl.join``), not by stride-2 accesses.
"""

# No ``from __future__ import annotations``: Triton 3.1's interpreter recognises a constexpr
# parameter only by its annotation object, and would pass BLOCK as a tensor.
import torch
import triton
import triton.language as tl

from ds_kernels._quant_op import QMAX, code_numel, num_blocks

#: values per program: blocks smaller than this are grouped into one tile
_TILE = 4096


def _blocks_per_program(block: int) -> int:
    return max(1, _TILE // block)


# Values each thread of a program holds: 0 is dequantize, 8 and 4 quantize at those bits.
# Quantize reduces each block before it writes, so a thread with more values in flight hides
# more of the load latency: swept on an H200, a 4096-value tile ran best with 64 values per
# thread for int8 (2 warps: 95% of copy bandwidth against 73% with 8) and 32 for int4, whose
# even/odd split holds more registers (4 warps: 67% against 57%); dequantize, with no
# reduction, is at 97-98% with 16 (8 warps).
_VALUES_PER_THREAD = {0: 16, 8: 64, 4: 32}


def _warps(tile: int, quant_bits: int) -> int:
    """Warps of a program over a tile of ``tile`` values (a power of two, at least 4096)."""
    return max(1, min(8, tile // (32 * _VALUES_PER_THREAD[quant_bits])))


# Launch options of every kernel here. With fp fusion on (Triton's default) LLVM and ptxas turn
# ``x * inv + 0.5`` into one fma, rounded once instead of twice as torch's separate multiply and
# add are, so a value near a .5 edge can get the neighbouring code.
_LAUNCH = {"enable_fp_fusion": False}


@triton.jit
def _scale_and_inverse(absmax, QMAX: tl.constexpr):
    """``absmax / qmax`` and ``qmax / absmax`` (0 for an all-zero block), both IEEE divisions:
    Triton's ``/`` on fp32 is the approximate ``div.full`` on NVIDIA GPUs (up to 2 ulp off),
    ``div_rn`` the correctly rounded quotient that torch computes. Triton 3.1 to 3.5 emit it
    with flush-to-zero (``div.rn.ftz``; 3.6 does not), which only changes a block whose scale
    would be subnormal: absmax below qmax * 2**-126, about 1.5e-36 for int8."""
    scale = tl.math.div_rn(absmax, QMAX)
    nonzero = absmax > 0
    inv = tl.where(nonzero, tl.math.div_rn(QMAX, tl.where(nonzero, absmax, 1.0)), 0.0)
    return scale, inv


@triton.jit
def _codes(x, inv, QMAX: tl.constexpr):
    """``floor(x * inv + 0.5)`` clamped to ``[-qmax, qmax]``: the product and the sum each rounded
    to fp32 (no fma: see ``_LAUNCH``), as the torch reference does."""
    q = tl.floor(x * inv + 0.5)
    return tl.minimum(tl.maximum(q, -QMAX), QMAX)


@triton.jit
def _tile(pid, nbp, BPP: tl.constexpr):
    """Row and first block of program ``pid`` (``nbp`` tiles per row), block ids [BPP]."""
    row = (pid // nbp).to(tl.int64)
    blk = (pid % nbp).to(tl.int64) * BPP + tl.arange(0, BPP)
    return row, blk


@triton.jit
def _quant8_kernel(x_ptr, q_ptr, s_ptr, n, nb, nbp, BLOCK: tl.constexpr, BPP: tl.constexpr):
    row, blk = _tile(tl.program_id(0), nbp, BPP)
    offs = blk[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # [BPP, BLOCK]
    mask = offs < n
    x = tl.load(x_ptr + row * n + offs, mask=mask, other=0.0).to(tl.float32)
    absmax = tl.max(tl.abs(x), axis=1)
    scale, inv = _scale_and_inverse(absmax, 127.0)
    tl.store(s_ptr + row * nb + blk, scale, mask=blk < nb)
    q = _codes(x, inv[:, None], 127.0)
    tl.store(q_ptr + row * n + offs, q.to(tl.int8), mask=mask)


@triton.jit
def _quant4_kernel(x_ptr, q_ptr, s_ptr, n, c, nb, nbp, BLOCK: tl.constexpr, BPP: tl.constexpr):
    row, blk = _tile(tl.program_id(0), nbp, BPP)
    offs = blk[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # [BPP, BLOCK]
    x = tl.load(x_ptr + row * n + offs, mask=offs < n, other=0.0).to(tl.float32)
    absmax = tl.max(tl.abs(x), axis=1)
    scale, inv = _scale_and_inverse(absmax, 7.0)
    tl.store(s_ptr + row * nb + blk, scale, mask=blk < nb)
    xe, xo = tl.split(tl.reshape(x, (BPP, BLOCK // 2, 2)))  # values 2h and 2h + 1
    qe = _codes(xe, inv[:, None], 7.0).to(tl.int32)
    qo = _codes(xo, inv[:, None], 7.0).to(tl.int32)
    byte = (qe & 15) | ((qo & 15) << 4)
    bidx = blk[:, None] * (BLOCK // 2) + tl.arange(0, BLOCK // 2)[None, :]
    tl.store(q_ptr + row * c + bidx, byte.to(tl.uint8), mask=bidx < c)


# Dequantize: one fp32 product per value, then the output dtype's round-to-nearest-even
# (cvt.rn), as torch's ``(q * scale).to(dtype)``.
@triton.jit
def _dequant8_kernel(q_ptr, s_ptr, out_ptr, n, nb, nbp, BLOCK: tl.constexpr, BPP: tl.constexpr):
    row, blk = _tile(tl.program_id(0), nbp, BPP)
    offs = blk[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = offs < n
    q = tl.load(q_ptr + row * n + offs, mask=mask, other=0).to(tl.float32)
    scale = tl.load(s_ptr + row * nb + blk, mask=blk < nb, other=0.0)
    out = q * scale[:, None]
    tl.store(out_ptr + row * n + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequant4_kernel(q_ptr, s_ptr, out_ptr, n, c, nb, nbp, BLOCK: tl.constexpr, BPP: tl.constexpr):
    row, blk = _tile(tl.program_id(0), nbp, BPP)
    bidx = blk[:, None] * (BLOCK // 2) + tl.arange(0, BLOCK // 2)[None, :]
    b = tl.load(q_ptr + row * c + bidx, mask=bidx < c, other=0).to(tl.int32)
    lo = ((b & 15) ^ 8) - 8
    hi = (((b >> 4) & 15) ^ 8) - 8
    scale = tl.load(s_ptr + row * nb + blk, mask=blk < nb, other=0.0)[:, None]
    ty = out_ptr.dtype.element_ty
    vals = tl.join((lo.to(tl.float32) * scale).to(ty), (hi.to(tl.float32) * scale).to(ty))
    out = tl.reshape(vals, (BPP, BLOCK))  # nibble pairs back in value order
    offs = blk[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    tl.store(out_ptr + row * n + offs, out, mask=offs < n)


def _launch(block: int, nb: int, rows: int, quant_bits: int = 0) -> tuple[tuple[int], dict]:
    """Grid and launch options; ``quant_bits`` 8 or 4 for a quantize kernel, 0 for dequantize."""
    bpp = _blocks_per_program(block)
    nbp = -(-nb // bpp)
    opts = dict(BLOCK=block, BPP=bpp, num_warps=_warps(block * bpp, quant_bits), **_LAUNCH)
    return (rows * nbp,), {"nbp": nbp, **opts}


def quantize_rows(rows: torch.Tensor, bits: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a contiguous 2-D CUDA tensor row by row."""
    r, n = rows.shape
    nb = num_blocks(n, block)
    scales = torch.empty(r, nb, dtype=torch.float32, device=rows.device)
    assert bits in QMAX
    grid, kw = _launch(block, nb, r, quant_bits=bits)
    if bits == 8:
        codes = torch.empty(r, n, dtype=torch.int8, device=rows.device)
        _quant8_kernel[grid](rows, codes, scales, n, nb, **kw)
    else:
        c = code_numel(n, 4)
        codes = torch.empty(r, c, dtype=torch.uint8, device=rows.device)
        _quant4_kernel[grid](rows, codes, scales, n, c, nb, **kw)
    return codes, scales


def dequantize_rows(
    codes: torch.Tensor, scales: torch.Tensor, bits: int, block: int, n: int, dtype: torch.dtype
) -> torch.Tensor:
    """Dequantize a contiguous 2-D CUDA code tensor row by row into ``dtype``."""
    r, c = codes.shape
    nb = scales.shape[1]
    out = torch.empty(r, n, dtype=dtype, device=codes.device)
    grid, kw = _launch(block, nb, r)
    if bits == 8:
        _dequant8_kernel[grid](codes, scales, out, n, nb, **kw)
    else:
        _dequant4_kernel[grid](codes, scales, out, n, c, nb, **kw)
    return out
