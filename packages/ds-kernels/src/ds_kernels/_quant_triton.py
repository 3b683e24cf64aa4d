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

How a kernel is launched is one ``Launch`` per kernel kind (``_DEFAULT_LAUNCH``). Besides the
default (one program per tile), the quantize kernels have launch variants that compute the same
fp32 operations on every value, so codes and scales are bit-identical whichever runs: cache hints
(``evict``: the input loaded ``evict_first``, the codes stored ``.cs``) and a persistent grid (a
few programs per SM, each looping over tiles; with ``stages`` > 1 the loop is software-pipelined,
so the loads of the next tiles are in flight while one tile is reduced and stored), and the
instruction that turns each floored value into an integer code (``codes``).
``benchmarks/zero/quant_bench.py --sweep`` times them against the default.
"""

# No ``from __future__ import annotations``: Triton 3.1's interpreter recognises a constexpr
# parameter only by its annotation object, and would pass BLOCK as a tensor.
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ds_kernels._quant_op import QMAX, TINY, code_numel, num_blocks
from ds_kernels._triton_launch import DirectLauncher, LaunchPlan, direct_launch_supported

#: values per program: blocks smaller than this are grouped into one tile
_TILE = 4096

#: ways of turning ``floor(t)`` into an integer code (``Launch.codes``, ``_codes``' CODES)
_CODES = {"floor": 0, "rmi": 1, "magic": 2}
#: the default launches' way: on an H100, "magic" ran level with or up to 1% faster than
#: "rmi" and "floor" (int4: 0.3-0.6% faster from 256 MB to 2 GB), in one sweep
_PLAIN_CODES = "magic"


@dataclass(frozen=True)
class Launch:
    """How one kernel is launched. Every setting runs the same fp32 operations on each value, so
    the codes and scales do not depend on it (the tests check this bit for bit); only the speed
    does. The fields other than the first two apply to the quantize kernels only.

    - ``values_per_thread``: values of a program's tile each thread holds; the program has
      ``tile / (32 * values_per_thread)`` warps, 1 to 8;
    - ``blocks_per_program`` (BPP): blocks per tile, 0 for enough blocks to make ``tile_values``
      values;
    - ``tile_values``: with ``blocks_per_program`` 0, the values of a tile (0: ``_TILE``), at
      least one block;
    - ``programs_per_sm``: 0 for one program per tile (the grid is the tile count); ``g`` for a
      persistent grid of ``g`` times the SM count (at most the tile count), each program looping
      over tiles ``pid, pid + grid, ...``. ``g`` programs must fit on an SM at once (registers,
      and ``stages - 1`` tiles of shared memory, twice as much for fp32 input as for 16-bit),
      or the programs that do not fit run after the others, a second wave of the whole length;
    - ``stages``: persistent only, the loop's ``tl.range(num_stages=...)``: 1 is a plain loop;
      with ``S`` > 1 Triton's pipeliner issues the loads of the next ``S - 1`` tiles (``cp.async``
      into shared memory) before the current tile is reduced and stored. It does so for vector
      loads only (seen in the sm_90 PTX of Triton 3.6 and 3.9): a 16-bit row whose length is
      not a multiple of 16, loaded value by value, gets a plain loop;
    - ``evict``: the input loaded with ``eviction_policy="evict_first"`` (it is read once) and
      the codes stored with ``cache_modifier=".cs"`` (streaming: written once, not read back);
    - ``wide_absmax``: each value widened to fp32 before the block's absmax is reduced, as
      before 0.1.10, instead of after (``_load_absmax``): the same result, more registers;
    - ``max_registers``: 0 for the compiler's choice, else a cap on the registers a thread
      uses (Triton's ``maxnreg``), so that more programs fit on an SM (65536 registers: at 2
      warps, 64 a thread fits 16 programs where 89 fits 11); values that do not fit spill to
      local memory;
    - ``unmasked``: where the row length is a multiple of the tile (every tile full), loads
      and stores without bounds masks (no per-value compare and select); elsewhere masked;
    - ``codes``: how ``floor(t)`` becomes an integer code (``_codes``; the same codes every
      way): ``"rmi"`` one ``cvt.rmi.s32.f32``; ``"magic"`` one ``add.rm.f32`` of ``1.5 * 2**23``,
      whose bits end in the code (full-rate fp32 adds, where conversions run at a quarter
      rate); ``"floor"`` a rounding then a conversion, as before 0.1.11.
    """

    values_per_thread: int
    blocks_per_program: int = 0
    tile_values: int = 0
    programs_per_sm: int = 0
    stages: int = 1
    evict: bool = False
    wide_absmax: bool = False
    max_registers: int = 0
    unmasked: bool = False
    codes: str = _PLAIN_CODES

    def __post_init__(self):
        if (
            self.values_per_thread < 1 or self.blocks_per_program < 0 or self.programs_per_sm < 0
            or self.tile_values < 0
        ):  # fmt: skip
            raise ValueError(f"invalid launch: {self}")
        if self.codes not in _CODES:
            raise ValueError(f"invalid launch (codes one of {sorted(_CODES)}): {self}")
        if self.max_registers and not 24 <= self.max_registers <= 255:
            raise ValueError(f"invalid launch (max_registers 0, or 24 to 255): {self}")
        if not 1 <= self.stages <= 4 or (self.stages > 1 and not self.programs_per_sm):
            raise ValueError(f"invalid launch (stages 1 to 4, > 1 only if persistent): {self}")

    @property
    def plain(self) -> bool:
        """One program per tile, no cache hints, absmax in the input dtype, registers as the
        compiler chooses, codes made the default way (``_PLAIN_CODES``): the kernels
        ``_quant8_kernel`` and the rest."""
        return not (
            self.programs_per_sm or self.evict or self.wide_absmax or self.max_registers
            or self.unmasked or self.codes != _PLAIN_CODES
        )  # fmt: skip

    def blocks(self, block: int) -> int:
        """Blocks per program (BPP) at block size ``block``."""
        return self.blocks_per_program or max(1, (self.tile_values or _TILE) // block)

    def num_warps(self, tile: int) -> int:
        """Warps of a program over a tile of ``tile`` values (a power of two)."""
        return max(1, min(8, tile // (32 * self.values_per_thread)))


# The launch of each kernel: quantize at 8 and 4 bits, dequantize at 0. Changing one line here
# switches that kernel to a variant (``quant_bench.py --sweep`` times the variants, recorded as
# ``sweep-*`` runs named after these fields), say ``8: Launch(32, programs_per_sm=4, stages=3)``
# for its ``persist-s3-w4-g4``; a persistent one must still fit ``g`` programs an SM with fp32
# input, whose pipeline stages take twice the shared memory (``Launch``).
#
# Values each thread of a program holds: quantize reduces each block before it writes, so a
# thread with more values in flight hides more of the load latency: swept on an H200, a
# 4096-value tile ran best with 64 values per thread for int8 (2 warps: 95% of copy bandwidth
# against 73% with 8) and 32 for int4, whose even/odd split holds more registers (4 warps: 67%
# against 57%); dequantize, with no reduction, is at 97-98% with 16 (8 warps). Swept again on an
# H100 with the variants: none beat these (persistent int8 at 93-95% of the copy bandwidth at
# 1-2 GB, the default at 101%; the cache hints 1-3% slower), except int4 with half the tile: 2
# warps over 8 of qgZ's 256-value blocks ran 3-5% faster than 4 warps over 16 at every size
# from 64 MB to 2 GB, in two runs on an H100 (Triton 3.6), so that is int4's default now.
# Neither a register cap nor dropping the bounds masks of full tiles sped int8 up.
_DEFAULT_LAUNCH = {
    8: Launch(values_per_thread=64),  # one program per 4096-value tile, 2 warps
    4: Launch(values_per_thread=32, tile_values=2048),  # 8 256-value blocks a tile, 2 warps
    0: Launch(values_per_thread=16),  # dequantize (no variants): 8 warps
}


#: ``_quant_op.TINY`` as a constant the kernels can read
_TINY = tl.constexpr(TINY)

# Launch options of every kernel here. With fp fusion on (Triton's default) LLVM and ptxas turn
# ``x * inv + 0.5`` into one fma, rounded once instead of twice as torch's separate multiply and
# add are, so a value near a .5 edge can get the neighbouring code.
_LAUNCH = {"enable_fp_fusion": False}


@triton.jit
def _scale_and_inverse(absmax, QMAX: tl.constexpr, TINY: tl.constexpr):
    """``absmax / qmax`` and ``qmax / absmax``, both IEEE divisions, and both 0 for a block below
    ``TINY`` (a NaN absmax keeps a NaN scale; an infinite one an infinite scale, ``inv`` 0):
    Triton's ``/`` on fp32 is the approximate ``div.full`` on NVIDIA GPUs (up to 2 ulp off),
    ``div_rn`` the correctly rounded quotient that torch computes. Triton 3.1 to 3.5 emit it
    with flush-to-zero (``div.rn.ftz``), which changes nothing here: below ``TINY`` both
    quotients are replaced by 0, and from it up the scale is a normal number."""
    usable = absmax >= TINY  # False for NaN
    scale = tl.where(absmax < TINY, 0.0, tl.math.div_rn(absmax, QMAX))
    inv = tl.where(usable, tl.math.div_rn(QMAX, tl.where(usable, absmax, 1.0)), 0.0)
    return scale, inv


@triton.jit
def _codes(x, inv, CODES: tl.constexpr):
    """``floor(x * inv + 0.5)`` as an int32 whose low 8 bits are the code (two's complement):
    the product and the sum each rounded to fp32 (no fma: see ``_LAUNCH``), as the torch
    reference does. No clamp to ``[-qmax, qmax]``: ``|x * inv|`` is at most
    ``qmax (1 + 2**-24)``, so a finite block's codes are already in range (the ``_quant_op``
    layout notes), and a non-finite block's codes are unspecified.

    ``CODES`` (``_CODES``): 0 rounds down, then converts (two PTX instructions, which ptxas
    may fuse); 1 does both in one ``cvt.rmi.s32.f32``; 2 adds ``1.5 * 2**23`` rounding down
    (``add.rm.f32``): for ``|t| < 2**22`` the sum is ``1.5 * 2**23 + floor(t)`` exactly (the
    spacing there is 1), so its bits are ``0x4B400000 + floor(t)``, whose low byte is the code,
    with no conversion instruction (those run at a quarter of the fp32 adds' rate on sm_90).
    Triton's interpreter has no libdevice: it runs 0."""
    t = x * inv + 0.5
    if CODES == 2:
        return libdevice.add_rd(t, 12582912.0).to(tl.int32, bitcast=True)
    if CODES == 1:
        return libdevice.float2int_rd(t)
    return tl.floor(t).to(tl.int32)


@triton.jit
def _max_nan(a, b):
    """max that is NaN when either operand is (PTX ``max.NaN``): ``tl.max`` skips NaN, so a block
    holding one would get a finite scale and the NaN would vanish from the values. Cast back to
    the operands' type: Triton 3.6 computes a bf16 maximum in fp32 (exact: the result is one of
    the operands), and a reduction's combine must keep its type."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL).to(a.dtype)


@triton.jit
def _tile(pid, nbp, BPP: tl.constexpr):
    """Row and block ids [BPP] of tile ``pid`` of a persistent grid's loop (``nbp`` tiles a
    row)."""
    row = (pid // nbp).to(tl.int64)
    blk = (pid % nbp).to(tl.int64) * BPP + tl.arange(0, BPP)
    return row, blk


@triton.jit
def _grid_tile(BPP: tl.constexpr):
    """Row and block ids [BPP] of a program of a 2-D grid (tiles of a row on axis 0, rows on
    axis 1): read off the program ids, without the integer division of ``_tile``, which is a
    few dozen dependent instructions ahead of a program's first load."""
    row = tl.program_id(1).to(tl.int64)
    blk = tl.program_id(0).to(tl.int64) * BPP + tl.arange(0, BPP)
    return row, blk


@triton.jit
def _load_absmax(ptrs, mask, EVICT: tl.constexpr, WIDE: tl.constexpr, EVEN: tl.constexpr):
    """A tile's input values as fp32 (0 where masked; ``evict_first`` with ``EVICT``) and each
    block's absmax (fp32, [BPP]).

    The absmax is reduced in the input dtype and widened once per block: abs and max are exact
    in any float type and widening is monotonic, so it equals the fp32 absmax bit for bit, while
    the tile stays packed (two 16-bit values a register) until the reduction is done; only then
    is each value widened for its code. Triton 3.9 then compiles the int8 kernel for fp16 input
    to 56 registers a thread instead of 89; Triton 3.6 allocates the same either way, and on an
    H100 the two orders ran within 1% of each other. ``WIDE`` widens first (the earlier order,
    kept for the benchmark's A/B). ``EVEN``: every value of the tile is in bounds, no mask."""
    if EVEN:
        if EVICT:
            raw = tl.load(ptrs, eviction_policy="evict_first")
        else:
            raw = tl.load(ptrs)
    elif EVICT:
        raw = tl.load(ptrs, mask=mask, other=0.0, eviction_policy="evict_first")
    else:
        raw = tl.load(ptrs, mask=mask, other=0.0)
    if WIDE:
        x = raw.to(tl.float32)
        return x, tl.reduce(tl.abs(x), 1, _max_nan)
    absmax = tl.reduce(tl.abs(raw), 1, _max_nan).to(tl.float32)
    return raw.to(tl.float32), absmax


@triton.jit
def _store_codes(ptrs, codes, mask, EVICT: tl.constexpr, EVEN: tl.constexpr):
    """Code bytes, stored streaming (``.cs``) with ``EVICT``; unmasked with ``EVEN``."""
    if EVEN:
        if EVICT:
            tl.store(ptrs, codes, cache_modifier=".cs")
        else:
            tl.store(ptrs, codes)
    elif EVICT:
        tl.store(ptrs, codes, mask=mask, cache_modifier=".cs")
    else:
        tl.store(ptrs, codes, mask=mask)


@triton.jit
def _store_scales(ptrs, scale, mask, EVEN: tl.constexpr):
    if EVEN:
        tl.store(ptrs, scale)
    else:
        tl.store(ptrs, scale, mask=mask)


@triton.jit
def _quant8_tile(
    x_ptr, q_ptr, s_ptr, n, nb, row, blk, BLOCK: tl.constexpr, EVICT: tl.constexpr,
    WIDE: tl.constexpr, EVEN: tl.constexpr, CODES: tl.constexpr,
):  # fmt: skip
    offs = blk[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # [BPP, BLOCK]
    mask = offs < n
    x, absmax = _load_absmax(x_ptr + row * n + offs, mask, EVICT, WIDE, EVEN)
    scale, inv = _scale_and_inverse(absmax, 127.0, _TINY)
    _store_scales(s_ptr + row * nb + blk, scale, blk < nb, EVEN)
    q = _codes(x, inv[:, None], CODES)
    _store_codes(q_ptr + row * n + offs, q.to(tl.int8), mask, EVICT, EVEN)


@triton.jit
def _quant4_tile(
    x_ptr, q_ptr, s_ptr, n, c, nb, row, blk, BLOCK: tl.constexpr, BPP: tl.constexpr,
    EVICT: tl.constexpr, WIDE: tl.constexpr, EVEN: tl.constexpr, CODES: tl.constexpr,
):  # fmt: skip
    offs = blk[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # [BPP, BLOCK]
    mask = offs < n
    x, absmax = _load_absmax(x_ptr + row * n + offs, mask, EVICT, WIDE, EVEN)
    scale, inv = _scale_and_inverse(absmax, 7.0, _TINY)
    _store_scales(s_ptr + row * nb + blk, scale, blk < nb, EVEN)
    xe, xo = tl.split(tl.reshape(x, (BPP, BLOCK // 2, 2)))  # values 2h and 2h + 1
    qe = _codes(xe, inv[:, None], CODES)
    qo = _codes(xo, inv[:, None], CODES)
    byte = (qe & 15) | ((qo & 15) << 4)
    bidx = blk[:, None] * (BLOCK // 2) + tl.arange(0, BLOCK // 2)[None, :]
    cmask = bidx < c
    _store_codes(q_ptr + row * c + bidx, byte.to(tl.uint8), cmask, EVICT, EVEN)


# The default launch: one program per tile, a 2-D grid (tiles, rows).
@triton.jit
def _quant8_kernel(
    x_ptr, q_ptr, s_ptr, n, nb, BLOCK: tl.constexpr, BPP: tl.constexpr, CODES: tl.constexpr
):  # fmt: skip
    row, blk = _grid_tile(BPP)
    _quant8_tile(x_ptr, q_ptr, s_ptr, n, nb, row, blk, BLOCK, False, False, False, CODES)


@triton.jit
def _quant4_kernel(
    x_ptr, q_ptr, s_ptr, n, c, nb, BLOCK: tl.constexpr, BPP: tl.constexpr, CODES: tl.constexpr
):  # fmt: skip
    row, blk = _grid_tile(BPP)
    _quant4_tile(x_ptr, q_ptr, s_ptr, n, c, nb, row, blk, BLOCK, BPP, False, False, False, CODES)


# The launch variants (``Launch``): the same tiles, with cache hints (EVICT) and/or a persistent
# grid whose programs loop over the ``ntiles`` tiles (PERSISTENT), software-pipelined over
# STAGES tiles when STAGES > 1 (Triton's interpreter runs the loop as a plain one), and/or the
# absmax reduced after widening to fp32 (WIDE), and/or a register cap (``maxnreg``), and/or no
# bounds masks where every tile is full (EVEN).
@triton.jit
def _quant8_variant_kernel(
    x_ptr, q_ptr, s_ptr, n, nb, nbp, ntiles, BLOCK: tl.constexpr, BPP: tl.constexpr,
    PERSISTENT: tl.constexpr, STAGES: tl.constexpr, EVICT: tl.constexpr, WIDE: tl.constexpr,
    EVEN: tl.constexpr, CODES: tl.constexpr,
):  # fmt: skip
    if PERSISTENT:
        for t in tl.range(tl.program_id(0), ntiles, tl.num_programs(0), num_stages=STAGES):
            row, blk = _tile(t, nbp, BPP)
            _quant8_tile(x_ptr, q_ptr, s_ptr, n, nb, row, blk, BLOCK, EVICT, WIDE, EVEN, CODES)
    else:
        row, blk = _grid_tile(BPP)
        _quant8_tile(x_ptr, q_ptr, s_ptr, n, nb, row, blk, BLOCK, EVICT, WIDE, EVEN, CODES)


@triton.jit
def _quant4_variant_kernel(
    x_ptr, q_ptr, s_ptr, n, c, nb, nbp, ntiles, BLOCK: tl.constexpr, BPP: tl.constexpr,
    PERSISTENT: tl.constexpr, STAGES: tl.constexpr, EVICT: tl.constexpr, WIDE: tl.constexpr,
    EVEN: tl.constexpr, CODES: tl.constexpr,
):  # fmt: skip
    if PERSISTENT:
        for t in tl.range(tl.program_id(0), ntiles, tl.num_programs(0), num_stages=STAGES):
            row, blk = _tile(t, nbp, BPP)
            _quant4_tile(x_ptr, q_ptr, s_ptr, n, c, nb, row, blk, BLOCK, BPP, EVICT, WIDE, EVEN,
                         CODES)  # fmt: skip
    else:
        row, blk = _grid_tile(BPP)
        _quant4_tile(x_ptr, q_ptr, s_ptr, n, c, nb, row, blk, BLOCK, BPP, EVICT, WIDE, EVEN, CODES)


@triton.jit
def _biased_to_float(u, BIAS: tl.constexpr, MAGIC: tl.constexpr):
    """``u - BIAS`` as fp32 (exact), for int32 ``0 <= u < 2**23``. ``MAGIC``: ``u`` written into
    the mantissa of ``2**23`` (``0x4B000000 | u`` is the float ``2**23 + u``) and ``2**23 + BIAS``
    subtracted, a logic op and an fp32 add, instead of the int-to-float conversion, which runs
    at a quarter of their rate on sm_90."""
    if MAGIC:
        return (u | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + BIAS)
    return (u - BIAS).to(tl.float32)


# Dequantize: one fp32 product per value, then the output dtype's round-to-nearest-even
# (cvt.rn), as torch's ``(q * scale).to(dtype)``. A code is read as its two's complement
# byte or nibble with the sign bit flipped (``^ 128``, ``^ 8``): the code plus 128 (or 8),
# unsigned, which ``_biased_to_float`` turns into the code.
@triton.jit
def _dequant8_kernel(
    q_ptr, s_ptr, out_ptr, n, nb, BLOCK: tl.constexpr, BPP: tl.constexpr, MAGIC: tl.constexpr
):  # fmt: skip
    row, blk = _grid_tile(BPP)
    offs = blk[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = offs < n
    q = tl.load(q_ptr + row * n + offs, mask=mask, other=0)
    u = q.to(tl.uint8, bitcast=True).to(tl.int32) ^ 128
    scale = tl.load(s_ptr + row * nb + blk, mask=blk < nb, other=0.0)
    out = _biased_to_float(u, 128.0, MAGIC) * scale[:, None]
    tl.store(out_ptr + row * n + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequant4_kernel(
    q_ptr, s_ptr, out_ptr, n, c, nb, BLOCK: tl.constexpr, BPP: tl.constexpr, MAGIC: tl.constexpr
):  # fmt: skip
    row, blk = _grid_tile(BPP)
    bidx = blk[:, None] * (BLOCK // 2) + tl.arange(0, BLOCK // 2)[None, :]
    b = tl.load(q_ptr + row * c + bidx, mask=bidx < c, other=0).to(tl.int32)
    lo = _biased_to_float((b & 15) ^ 8, 8.0, MAGIC)
    hi = _biased_to_float(((b >> 4) & 15) ^ 8, 8.0, MAGIC)
    scale = tl.load(s_ptr + row * nb + blk, mask=blk < nb, other=0.0)[:, None]
    ty = out_ptr.dtype.element_ty
    vals = tl.join((lo * scale).to(ty), (hi * scale).to(ty))
    out = tl.reshape(vals, (BPP, BLOCK))  # nibble pairs back in value order
    offs = blk[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    tl.store(out_ptr + row * n + offs, out, mask=offs < n)


def _launch(
    block: int, nb: int, rows: int, quant_bits: int = 0, launch: Launch | None = None, sms: int = 0,
    n: int = 0,
) -> tuple[tuple[int, ...], dict]:  # fmt: skip
    """Grid and launch options; ``quant_bits`` 8 or 4 for a quantize kernel, 0 for dequantize.
    ``launch`` defaults to ``_DEFAULT_LAUNCH[quant_bits]``; one that is not ``plain`` is for
    ``_quant{8,4}_variant_kernel`` and, when persistent, needs the SM count ``sms``; an
    ``unmasked`` one drops the masks only when the row length ``n`` is a multiple of the
    tile. The grid is ``(tiles a row, rows)`` (``rows`` at most ``MAX_GRID_ROWS``: the caller
    launches longer inputs in slices) or, persistent, ``(programs,)``."""
    launch = _DEFAULT_LAUNCH[quant_bits] if launch is None else launch
    bpp = launch.blocks(block)
    nbp = -(-nb // bpp)
    opts = dict(BLOCK=block, BPP=bpp, num_warps=launch.num_warps(block * bpp), **_LAUNCH)
    if quant_bits:
        opts["CODES"] = 0 if _interpreted() else _CODES[launch.codes]
    else:
        opts["MAGIC"] = True
    if launch.plain:
        return (nbp, rows), opts
    if not quant_bits:
        raise ValueError(f"dequantize has one launch, one program per tile: {launch}")
    ntiles = rows * nbp
    grid: tuple[int, ...] = (nbp, rows)
    if launch.programs_per_sm:
        if sms < 1:
            raise ValueError("a persistent launch needs the SM count")
        grid = (max(1, min(ntiles, launch.programs_per_sm * sms)),)
    flags = dict(
        PERSISTENT=launch.programs_per_sm > 0, STAGES=launch.stages, EVICT=launch.evict,
        WIDE=launch.wide_absmax, EVEN=launch.unmasked and n > 0 and n % (block * bpp) == 0,
    )  # fmt: skip
    if launch.max_registers:
        flags["maxnreg"] = launch.max_registers
    return grid, {"nbp": nbp, "ntiles": ntiles, **flags, **opts}


#: rows of one launch: a CUDA grid's second axis holds at most 65535 programs
MAX_GRID_ROWS = 65535


def _row_chunks(rows: int, *tensors: torch.Tensor) -> list[tuple[int, tuple[torch.Tensor, ...]]]:
    """``(row count, tensors)`` for each launch over ``rows`` rows: the tensors themselves when
    one launch covers them all (no views built on the common path), else their slices of at
    most ``MAX_GRID_ROWS`` rows."""
    if rows <= MAX_GRID_ROWS:
        return [(rows, tensors)]
    return [
        (min(rows, r + MAX_GRID_ROWS) - r, tuple(t[r : r + MAX_GRID_ROWS] for t in tensors))
        for r in range(0, rows, MAX_GRID_ROWS)
    ]


def _interpreted() -> bool:
    """Whether the kernels run under Triton's interpreter (``TRITON_INTERPRET=1`` when this module
    was imported), which has no libdevice (``_codes``)."""
    return not isinstance(_quant8_kernel, triton.runtime.JITFunction)


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 2 elsewhere (Triton's interpreter on CPU
    tensors), so that a persistent grid there is small and each program loops over tiles."""
    if device.type != "cuda":
        return 2
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def quantize_into(
    rows: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    block: int,
    launch: Launch | None = None,
    sms: int = 0,
):
    """Quantize the contiguous 2-D ``rows`` into ``codes`` (``(r, n)`` int8 or ``(r, ceil(n/2))``
    uint8) and ``scales`` (``(r, num_blocks)`` fp32) with ``launch`` (default: the default
    launch at ``bits``); ``sms`` overrides the SM count a persistent launch sizes its grid by.
    Returns what the Triton launch returns (the compiled kernel; None under the interpreter)."""
    r, n = rows.shape
    nb = scales.shape[1]
    assert bits in QMAX and nb == num_blocks(n, block) and codes.shape == (r, code_numel(n, bits))
    launch = _DEFAULT_LAUNCH[bits] if launch is None else launch
    if launch.programs_per_sm and sms < 1:
        sms = sm_count(rows.device)
    if launch.plain:
        kernel = _quant8_kernel if bits == 8 else _quant4_kernel
    else:
        kernel = _quant8_variant_kernel if bits == 8 else _quant4_variant_kernel
    sizes = (n, nb) if bits == 8 else (n, codes.shape[1], nb)
    compiled = None
    for count, tensors in _row_chunks(r, rows, codes, scales):
        grid, kw = _launch(block, nb, count, bits, launch, sms, n)
        compiled = kernel[grid](*tensors, *sizes, **kw)
    return compiled


def quantize_rows(
    rows: torch.Tensor, bits: int, block: int, launch: Launch | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a contiguous 2-D CUDA tensor row by row (``launch``: see ``quantize_into``)."""
    r, n = rows.shape
    assert bits in QMAX
    scales = torch.empty(r, num_blocks(n, block), dtype=torch.float32, device=rows.device)
    dtype = torch.int8 if bits == 8 else torch.uint8
    codes = torch.empty(r, code_numel(n, bits), dtype=dtype, device=rows.device)
    quantize_into(rows, codes, scales, bits, block, launch)
    return codes, scales


def dequantize_rows(
    codes: torch.Tensor, scales: torch.Tensor, bits: int, block: int, n: int, dtype: torch.dtype
) -> torch.Tensor:
    """Dequantize a contiguous 2-D CUDA code tensor row by row into ``dtype``, launched through
    Triton's JIT (dequantize has one launch: ``QuantizerKernels``' with no direct launches)."""
    return QuantizerKernels(direct=False).dequantize(codes, scales, bits, block, n, dtype)


#: launch plans kept per ``QuantizerKernels``: one per (kernel, block, row length, rows) met;
#: past this many the cache starts over (a plan takes a few microseconds to rebuild)
_MAX_PLANS = 1024


class QuantizerKernels:
    """The default launches of the four kernels, with as little host work per call as the
    layout allows: outputs allocated in their final shape (no reshapes, no views: the kernels
    take the contiguous input's address as ``rows x n``), the grid and options of each shape
    planned once, and the compiled kernel launched directly (``_triton_launch``).

    ``direct`` None launches directly where this Triton supports it (never under the
    interpreter); False always through Triton's JIT, as ``quantize_rows`` does.

    Before the first call with direct launches, ``check_direct`` runs the four kernels both ways
    on a small tensor and compares the results bit for bit; any difference or error turns the
    direct launches off, with a warning, so a Triton whose launch convention differs from the
    one followed here costs host time, never results."""

    def __init__(self, direct: bool | None = None):
        if direct is None:
            direct = not _interpreted() and direct_launch_supported(triton)
        self.launchers: dict[int, DirectLauncher] = {
            8: DirectLauncher(_quant8_kernel, direct),
            4: DirectLauncher(_quant4_kernel, direct),
            -8: DirectLauncher(_dequant8_kernel, direct),
            -4: DirectLauncher(_dequant4_kernel, direct),
        }
        self.plans: dict[tuple[int, int, int, int], LaunchPlan] = {}
        self.direct_checked = not direct  # nothing to check when never launching directly

    def check_direct(self, device: torch.device) -> bool:
        """Quantize and dequantize a small tensor on ``device`` (int8 and int4, so all four
        kernels) through Triton's JIT and directly, compare bit for bit, and keep the direct
        launches only if every result agrees. Returns whether they are kept."""
        import warnings

        self.direct_checked = True
        reference = QuantizerKernels(direct=False)
        x = (torch.arange(4999, device=device, dtype=torch.float32) - 2500.25) / 97
        problem = None
        try:
            for bits, block in ((8, 4096), (4, 256)):
                want = reference.quantize(x, bits, block)
                want_back = reference.dequantize(*want, bits, block, x.numel(), torch.float16)
                for _ in range(2):  # the first call compiles (JIT), the second launches directly
                    got = self.quantize(x, bits, block)
                    back = self.dequantize(*got, bits, block, x.numel(), torch.float16)
                    if not (
                        torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
                        and torch.equal(back, want_back)
                    ):  # fmt: skip
                        problem = f"different results at {bits} bits"
                        break
                if problem:
                    break
        except Exception as exc:  # noqa: BLE001 - any failure means: do not launch directly
            problem = f"{type(exc).__name__}: {exc}"
        if problem is None:
            return True
        for launcher in self.launchers.values():
            launcher.direct = False
        warnings.warn(
            f"ds-kernels quantizer: launching Triton {triton.__version__}'s compiled kernels "
            f"directly failed its check ({problem}); launching through Triton's JIT instead, "
            "which gives the same results with more host time per call",
            RuntimeWarning,
            stacklevel=2,
        )
        return False

    def plan(self, kind: int, block: int, n: int, rows: int) -> LaunchPlan:
        """The launch of ``rows`` rows of ``n`` values (``kind``: bits, negative to
        dequantize), at most ``MAX_GRID_ROWS`` rows."""
        key = (kind, block, n, rows)
        plan = self.plans.get(key)
        if plan is None:
            grid, kw = _launch(block, num_blocks(n, block), rows, max(kind, 0))
            plan = LaunchPlan.build(self.launchers[kind].kernel, grid, kw)
            if len(self.plans) >= _MAX_PLANS:
                self.plans.clear()
            self.plans[key] = plan
        return plan

    def _run(self, kind: int, block: int, n: int, rows: int, tensors, sizes) -> None:
        launcher = self.launchers[kind]
        if rows <= MAX_GRID_ROWS:
            launcher(self.plan(kind, block, n, rows), *tensors, *sizes)
            return
        flat = [t.view(rows, -1) for t in tensors]
        for count, chunk in _row_chunks(rows, *flat):
            launcher(self.plan(kind, block, n, count), *chunk, *sizes)

    def quantize(self, x: torch.Tensor, bits: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes ``(*lead, code_numel(n))`` and scales ``(*lead, num_blocks(n))`` of the
        contiguous, non-empty ``x`` (``(*lead, n)``; a 0-d tensor is one row of 1)."""
        if not self.direct_checked:
            self.check_direct(x.device)
        shape = x.shape
        n = shape[-1] if shape else 1
        lead = shape[:-1]
        rows = x.numel() // n
        nb = num_blocks(n, block)
        c = code_numel(n, bits)
        codes = torch.empty((*lead, c), dtype=torch.int8 if bits == 8 else torch.uint8,
                            device=x.device)  # fmt: skip
        scales = torch.empty((*lead, nb), dtype=torch.float32, device=x.device)
        sizes = (n, nb) if bits == 8 else (n, c, nb)
        self._run(bits, block, n, rows, (x, codes, scales), sizes)
        return codes, scales

    def dequantize(
        self, codes: torch.Tensor, scales: torch.Tensor, bits: int, block: int, n: int,
        dtype: torch.dtype, out: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """``(*lead, n)`` values of ``dtype`` from contiguous ``codes`` (``(*lead, c)``) and
        contiguous fp32 ``scales`` (``nb`` a row), their sizes already checked; written into
        ``out`` if given (contiguous, as many elements, that dtype), which is returned."""
        if not self.direct_checked:
            self.check_direct(codes.device)
        shape = codes.shape
        c = shape[-1] if shape else 1
        rows = codes.numel() // c
        nb = num_blocks(n, block)
        if out is None:
            out = torch.empty((*shape[:-1], n), dtype=dtype, device=codes.device)
        sizes = (n, nb) if bits == 8 else (n, c, nb)
        self._run(-bits, block, n, rows, (codes, scales, out), sizes)
        return out
