"""Triton kernels of the fused per-expert bias add + activation (see ``_bias_act``).

Imported only where the fused path runs (it needs triton). Three kernels, all over tiles of
``BLOCK_M`` rows x ``BLOCK_N`` columns of the [rows, ffn] GEMM output ``y``:

- forward: ``h = act(round(y + b[g(row)]))``: reads y once, writes h once;
- backward: ``dz = dh * act'(round(y + b[g(row)]))`` in the same pass also sums ``dz`` per
  (tile, group) into an fp32 partial buffer: reads dh and y once, writes dz once;
- group sum: ``db[g] = sum of g's partials`` in a fixed order (no atomics: deterministic).

``g(row)``, the row's local expert, is found in the kernels from the int32 group ends ``offs``
(no host copy, no per-row index tensor); rows past ``offs[-1]`` are not read or written (their
values are undefined on the grouped path, as the grouped GEMM leaves them).

The math is torch's CUDA formulas in fp32 (``GeluCUDAKernelImpl``, ``GeluBackwardCUDAKernelImpl``,
``silu_kernel``, ``threshold_backward``), and ``y + b`` is rounded to the storage dtype first, as
the unfused in-place add stores it, so both paths apply the activation to the same input.
``INTERP``: the kernels run in Triton's interpreter (TRITON_INTERPRET=1, the CPU tests),
which has no libdevice and truncates fp32 -> bf16; on a GPU that branch compiles away.
``ACT`` codes: 0 relu, 1 erf GELU, 2 tanh GELU, 3 silu (``_bias_act.activation_code``).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

#: Under TRITON_INTERPRET=1 (the CPU tests) the kernels run in numpy (see INTERP above).
INTERPRET = bool(
    triton.knobs.runtime.interpret
    if hasattr(triton, "knobs")  # triton >= 3.4; before, the variable itself
    else os.environ.get("TRITON_INTERPRET", "0") == "1"
)

# torch's constants, computed in double and rounded once to fp32 as its kernels do
_SQRT1_2 = tl.constexpr(math.sqrt(0.5))  # erf GELU: x * 0.5 * (1 + erf(x / sqrt 2))
_ERF_PDF = tl.constexpr(2 / math.sqrt(math.pi) * math.sqrt(0.5) * 0.5)  # its pdf factor
_TANH_BETA = tl.constexpr(math.sqrt(2) * 2 / math.sqrt(math.pi) * 0.5)  # sqrt(2 / pi)
_TANH_KAPPA = tl.constexpr(0.044715)


@triton.jit
def _exp(x, INTERP: tl.constexpr):
    # libdevice's expf is CUDA's (torch's) expf; tl.exp lowers to the approximate ex2
    if INTERP:
        return tl.exp(x)
    else:
        return libdevice.exp(x)


@triton.jit
def _tanh(x, INTERP: tl.constexpr):
    if INTERP:  # numpy: tanh from exp, odd-symmetric so small |x| keeps its sign
        t = 1.0 - 2.0 / (tl.exp(2.0 * tl.abs(x)) + 1.0)
        return tl.where(x < 0, -t, t)
    else:
        return libdevice.tanh(x)


@triton.jit
def _round(x, dtype: tl.constexpr, INTERP: tl.constexpr):
    """fp32 -> dtype, rounding to nearest even (the GPU's conversion; torch's too)."""
    if INTERP and dtype == tl.bfloat16:
        # the interpreter truncates fp32 -> bf16: round the bits first (NaN stays NaN)
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(dtype)
    else:
        return x.to(dtype)


@triton.jit
def _act(z, ACT: tl.constexpr, INTERP: tl.constexpr):
    if ACT == 0:  # relu; z <= 0 (not z > 0) so that NaN passes as in torch
        return tl.where(z <= 0.0, 0.0, z)
    elif ACT == 1:
        return z * 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2))
    elif ACT == 2:
        inner = _TANH_BETA * (z + _TANH_KAPPA * (z * z * z))
        return 0.5 * z * (1.0 + _tanh(inner, INTERP))
    else:  # silu
        return tl.math.div_rn(z, 1.0 + _exp(-z, INTERP))


@triton.jit
def _act_grad(z, dy, ACT: tl.constexpr, INTERP: tl.constexpr):
    if ACT == 0:
        return tl.where(z <= 0.0, 0.0, dy)
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2))
        pdf = _exp(-0.5 * z * z, INTERP) * _ERF_PDF
        return dy * (cdf + z * pdf)
    elif ACT == 2:
        z_sq = z * z
        inner = _TANH_BETA * (z + _TANH_KAPPA * (z_sq * z))
        t = _tanh(inner, INTERP)
        left_derivative = 0.5 * (1.0 + t)
        inner_derivative = _TANH_BETA * (1.0 + 3.0 * _TANH_KAPPA * z_sq)
        right_derivative = 0.5 * z * (1.0 - t * t) * inner_derivative
        return dy * (left_derivative + right_derivative)
    else:
        s = tl.math.div_rn(1.0, 1.0 + _exp(-z, INTERP))
        return dy * s * (1.0 + z * (1.0 - s))


@triton.jit
def _group_of_rows(offs_ptr, rows, E: tl.constexpr, E_POW2: tl.constexpr):
    """Per row, how many group ends are <= row: its group, or E past the last group.

    All E ends in one vector load, then a [rows, E] compare-and-count: one memory round trip
    per program (a binary search would chain log2(E) + 1 dependent loads before the tile's
    bias could be fetched).
    """
    e = tl.arange(0, E_POW2)
    ends = tl.load(offs_ptr + e, mask=e < E, other=2147483647)
    return tl.sum((ends[None, :] <= rows[:, None]).to(tl.int32), axis=1)


@triton.jit
def _tile(offs_ptr, rows, cols, E: tl.constexpr, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr,
          BLOCK_N: tl.constexpr):  # fmt: skip
    """This program's tile: (row block, row ids, column ids, row groups, in-group mask,
    in-bounds mask).

    Loads of the [rows, ffn] tensors take the in-bounds mask, which does not wait for the
    groups, so they are in flight while the groups are found; only stores (and the bias
    gather) take the in-group mask. Rows past the last group are read (undefined values, never
    stored or summed).
    """
    pid = tl.program_id(0)
    col_blocks = tl.cdiv(cols, BLOCK_N)
    # columns fastest: neighbouring programs stream neighbouring memory
    pid_m = pid // col_blocks
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    c = (pid % col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = _group_of_rows(offs_ptr, r, E, E_POW2)
    row_ok = (g < E) & (r < rows)
    mask = row_ok[:, None] & (c < cols)[None, :]
    in_bounds = (r < rows)[:, None] & (c < cols)[None, :]
    return pid_m, r.to(tl.int64), c, g, row_ok, mask, in_bounds


@triton.jit
def _fwd_kernel(y_ptr, b_ptr, offs_ptr, h_ptr, rows, cols, stride_y, stride_b, stride_h,
                E: tl.constexpr, E_POW2: tl.constexpr, ACT: tl.constexpr, INTERP: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    _, r, c, g, _, mask, in_bounds = _tile(offs_ptr, rows, cols, E, E_POW2, BLOCK_M, BLOCK_N)
    y = tl.load(y_ptr + r[:, None] * stride_y + c[None, :], mask=in_bounds, other=0.0)
    # E x ffn biases stay in L2; each row reads its expert's
    b = tl.load(b_ptr + g[:, None] * stride_b + c[None, :], mask=mask, other=0.0)
    z = _round(y.to(tl.float32) + b.to(tl.float32), y.dtype, INTERP).to(tl.float32)
    h = _round(_act(z, ACT, INTERP), h_ptr.dtype.element_ty, INTERP)
    tl.store(h_ptr + r[:, None] * stride_h + c[None, :], h, mask=mask)


@triton.jit
def _bwd_kernel(dh_ptr, y_ptr, b_ptr, offs_ptr, dz_ptr, part_ptr, rows, cols, stride_dh, stride_y,
                stride_b, stride_dz, E: tl.constexpr, E_POW2: tl.constexpr, ACT: tl.constexpr,
                INTERP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    pid_m, r, c, g, row_ok, mask, in_bounds = _tile(
        offs_ptr, rows, cols, E, E_POW2, BLOCK_M, BLOCK_N
    )
    dh = tl.load(dh_ptr + r[:, None] * stride_dh + c[None, :], mask=in_bounds, other=0.0)
    y = tl.load(y_ptr + r[:, None] * stride_y + c[None, :], mask=in_bounds, other=0.0)
    b = tl.load(b_ptr + g[:, None] * stride_b + c[None, :], mask=mask, other=0.0)
    z = _round(y.to(tl.float32) + b.to(tl.float32), y.dtype, INTERP).to(tl.float32)
    dz = _round(_act_grad(z, dh.to(tl.float32), ACT, INTERP), dz_ptr.dtype.element_ty, INTERP)
    tl.store(dz_ptr + r[:, None] * stride_dz + c[None, :], dz, mask=mask)
    # The bias gradient sums the stored (rounded) dz, as the unfused grouped sum reads it.
    # One partial row per (tile, group) pair at index pid_m + group: along the rows both
    # grow and at least one strictly, so the index is unique (see _group_sum_kernel).
    dzf = dz.to(tl.float32)
    g_lo = tl.min(tl.where(row_ok, g, E))
    g_hi = tl.max(tl.where(row_ok, g, -1))
    for gi in range(g_lo, g_hi + 1):
        s = tl.sum(tl.where((g == gi)[:, None], dzf, 0.0), axis=0)
        tl.store(part_ptr + (pid_m + gi).to(tl.int64) * cols + c, s, mask=c < cols)


@triton.jit
def _group_sum_kernel(part_ptr, offs_ptr, db_ptr, cols, stride_db, INTERP: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    gi = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    end = tl.load(offs_ptr + gi)
    start = tl.where(gi > 0, tl.load(offs_ptr + tl.maximum(gi - 1, 0)), 0)
    # the row tiles that hold rows of group gi wrote partial row tile + gi; an empty group
    # has none (and its index may belong to another group's tile): it reads nothing
    lo = start // BLOCK_M
    hi = tl.where(end > start, tl.cdiv(end, BLOCK_M), lo)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for t in range(lo, hi):  # fixed order: the same sum every run
        acc += tl.load(part_ptr + (t + gi).to(tl.int64) * cols + c, mask=c < cols, other=0.0)
    db = _round(acc, db_ptr.dtype.element_ty, INTERP)
    tl.store(db_ptr + gi * stride_db + c, db, mask=c < cols)


def tile_shape(cols: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): 16 x 128 tiles, 2 warps, 32 elements per thread.

    On an H100 (bf16, 16,384 and 32,768 rows x 8,192) this tile ran the forward + backward in
    0.69 / 1.31 ms, against 0.81 / 1.52 ms at 64 x 128 with 8 warps and 0.87 / 1.70 ms for the
    unfused passes; larger tiles were slower still (``benchmarks/moe/bias_act_bench.py
    --tiles``). More, smaller programs keep more loads in flight per multiprocessor.

    BLOCK_M also sets the partial buffer of the backward, (rows / BLOCK_M + E) x ffn fp32:
    8 / BLOCK_M bytes per element written and read again, 0.5 of the pass's 6 (bf16) at 16,
    which the measurement above includes.
    """
    return 16, min(128, max(16, triton.next_power_of_2(cols))), 2


def _consts(offs: torch.Tensor) -> dict:
    e = offs.numel()
    return dict(E=e, E_POW2=triton.next_power_of_2(e), INTERP=INTERPRET)


def forward(
    y: torch.Tensor,
    bias: torch.Tensor,
    offs: torch.Tensor,
    act: int,
    tile: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """``h = act(y + b[group])``; ``tile`` (BLOCK_M, BLOCK_N, warps) overrides ``tile_shape``
    (``benchmarks/moe/bias_act_bench.py --tiles`` times shapes with it)."""
    rows, cols = y.shape
    h = torch.empty(rows, cols, device=y.device, dtype=y.dtype)
    bm, bn, warps = tile or tile_shape(cols)
    grid = (triton.cdiv(rows, bm) * triton.cdiv(cols, bn),)
    _fwd_kernel[grid](y, bias, offs, h, rows, cols, y.stride(0), bias.stride(0), h.stride(0),
                      ACT=act, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
                      **_consts(offs))  # fmt: skip
    return h


def backward(
    dh: torch.Tensor,
    y: torch.Tensor,
    bias: torch.Tensor,
    offs: torch.Tensor,
    act: int,
    tile: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dz, db)``; ``tile`` as in ``forward``."""
    rows, cols = y.shape
    e = offs.numel()
    dz = torch.empty(rows, cols, device=y.device, dtype=y.dtype)
    db = torch.empty(e, cols, device=y.device, dtype=bias.dtype)
    bm, bn, warps = tile or tile_shape(cols)
    row_tiles = triton.cdiv(rows, bm)
    # only the entries that tiles write are read back: no zero fill
    part = torch.empty(row_tiles + e - 1, cols, device=y.device, dtype=torch.float32)
    grid = (row_tiles * triton.cdiv(cols, bn),)
    _bwd_kernel[grid](dh, y, bias, offs, dz, part, rows, cols, dh.stride(0), y.stride(0),
                      bias.stride(0), dz.stride(0), ACT=act, BLOCK_M=bm, BLOCK_N=bn,
                      num_warps=warps, **_consts(offs))  # fmt: skip
    bn2 = min(256, max(16, triton.next_power_of_2(cols)))
    _group_sum_kernel[(e, triton.cdiv(cols, bn2))](part, offs, db, cols, db.stride(0),
                                                   INTERP=INTERPRET, BLOCK_M=bm, BLOCK_N=bn2,
                                                   num_warps=4)  # fmt: skip
    return dz, db
