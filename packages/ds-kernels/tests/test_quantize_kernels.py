"""The quantizer's Triton kernels against the pure-PyTorch reference: under Triton's interpreter
on CPU tensors (where Triton is installed), compiled for an H100 (PTX, no GPU needed), and on a
GPU. No hypothesis here, so the GPU machine (which may lack it) runs this module.

What is guaranteed (``_quant_op``'s docstring): every implementation computes the same IEEE fp32
operations, so codes, scales and dequantized values are bit-identical on a GPU, and on the CPU
under the interpreter except for its bf16 outputs (the interpreter truncates fp32 to bf16 where a
GPU rounds to nearest-even)."""

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import ds_kernels
from ds_kernels._quant_op import QMAX, TINY, TorchQuantizer

REF = TorchQuantizer()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ds_kernels.KernelBuildWarning)
        yield


def _unpack4(c):
    b = c.to(torch.int16)
    return torch.stack((((b & 15) ^ 8) - 8, ((b >> 4) ^ 8) - 8), -1).reshape(c.shape[0], -1)


def _edge_rows(dtype, bits, block, nblocks):
    """Blocks whose values sit on and 1-2 ulp around the ``k + 0.5`` edges of ``x * inv``, where
    an fma, an approximate division or torch's ``qmax / absmax`` (a reciprocal, then a product)
    gives the neighbouring code. Each block's absmax is ``3 * qmax / 64``, so ``inv = 64 / 3``
    is inexact while ``x = 3 (k + 0.5) / 64`` is an exact tie in real arithmetic."""
    qmax = QMAX[bits]
    absmax = torch.tensor([3.0 * qmax / 64]).to(dtype).float()  # bf16 rounds 381/64 for int8
    ties = (torch.arange(-qmax, qmax).float() + 0.5) * 3 / 64
    bits32 = ties.view(torch.int32)
    near = torch.cat([(bits32 + d).view(torch.float32) for d in (0, -1, 1, -2, 2)])
    near = near.to(dtype).float().clamp(-absmax, absmax)
    fill = near.repeat(-(-nblocks * (block - 1) // near.numel()))[: nblocks * (block - 1)]
    rows = torch.cat([absmax.expand(nblocks, 1), fill.view(nblocks, block - 1)], dim=1)
    return rows.reshape(1, nblocks * block).to(dtype)


def _special_rows(dtype, block):
    """One row of six blocks: ordinary values, one NaN, one +inf, a -inf and a NaN, values below
    ``TINY`` (stored as zeros) and a block whose absmax is ``TINY`` itself (the smallest kept;
    fp16 cannot hold either, so it gets ordinary values there)."""
    g = torch.Generator().manual_seed(block)
    blocks = torch.randn(6, block, generator=g)
    blocks[1, 3] = float("nan")
    blocks[2, -1] = float("inf")
    blocks[3, 0], blocks[3, 1] = float("-inf"), float("nan")
    if dtype is not torch.float16:
        blocks[4] = blocks[4] / blocks[4].abs().max() * (TINY / 2)
        blocks[5] = blocks[5] / blocks[5].abs().max() * TINY
        blocks[5, 0] = TINY
    return blocks.reshape(1, 6 * block).to(dtype)


def _check_special(x, codes, scales, back, bits, block):
    """What ``_special_rows`` must give against the reference: the same scales (NaN where the
    block holds a NaN, infinite where it holds an infinity and no NaN, 0 below ``TINY``), the
    same codes in the finite blocks, and every value of a non-finite block non-finite after the
    round trip."""
    dtype = x.dtype
    ref_codes, ref_scales = REF.quantize(x.cpu(), bits, block)
    got_scales = scales.cpu().reshape(6)
    torch.testing.assert_close(got_scales, ref_scales.reshape(6), rtol=0, atol=0, equal_nan=True)
    assert got_scales[1].isnan() and got_scales[3].isnan() and got_scales[2] == float("inf")
    finite = [0, 4, 5]
    got = _ints(codes, bits, x.shape[-1]).reshape(6, block)
    want = _ints(ref_codes, bits, x.shape[-1]).reshape(6, block)
    assert torch.equal(got[finite], want[finite])
    vals = back.float().cpu().reshape(6, block)
    assert not bool(vals[1:4].isfinite().any())
    if dtype is not torch.float16:
        assert got_scales[4] == 0 and not bool(got[4].any()) and not bool(vals[4].any())
        assert got_scales[5] == torch.tensor(TINY / QMAX[bits], dtype=torch.float32)
        assert vals[5, 0] == TINY and got[5, 0] == QMAX[bits]


def _ints(codes, bits, n):
    """Codes as one int per value (int4 unpacked), ``n`` per row, on the CPU."""
    c = codes.cpu().reshape(-1, codes.shape[-1])
    return (c.int() if bits == 8 else _unpack4(c).int())[:, :n]


def _mismatch(x, got, want, bits, block, unpacked=False):
    """The first differing codes with ``x * qmax / absmax`` in float64, for the failure message."""
    n = x.shape[-1]
    a, b = (got, want) if unpacked else (_ints(got, bits, n), _ints(want, bits, n))
    xf = x.float().cpu().reshape(-1, n)
    out = []
    for r, i in (a != b).nonzero()[:5].tolist():
        blk = xf[r, (i // block) * block : (i // block + 1) * block]
        y = float(xf[r, i]) * QMAX[bits] / float(blk.abs().max())
        out.append(
            f"[{r},{i}] x={float(xf[r, i])!r} y~{y!r} got {int(a[r, i])} want {int(b[r, i])}"
        )
    return f"{int((a != b).sum())} codes differ: " + "; ".join(out)


def _ieee_reference(x, bits, block):
    """The documented formula computed in float64 and rounded to fp32 after each operation: for
    +, *, / of fp32 values float64 has enough bits that this double rounding gives the correctly
    rounded fp32 result, so this is an independent statement of what the codes must be."""
    qmax = QMAX[bits]
    rows = x.float().reshape(-1, x.shape[-1])
    n = rows.shape[1]
    nb = -(-n // block)
    xb = torch.nn.functional.pad(rows, (0, nb * block - n)).view(-1, nb, block).double()
    absmax = xb.abs().amax(-1)
    q64 = torch.full_like(absmax, float(qmax))
    scale = (absmax / q64).float()
    inv = torch.where(absmax > 0, q64 / absmax.clamp_min(1e-300), 0.0).float().double()
    y = (xb * inv.unsqueeze(-1)).float().double()
    codes = torch.floor((y + 0.5).float().double()).clamp(-qmax, qmax)
    return codes.view(-1, nb * block)[:, :n].to(torch.int8), scale


def test_reference_is_the_correctly_rounded_fp32_formula():
    """The fallback (the kernels' reference) gives exactly the IEEE fp32 codes and scales: torch's
    ``number / tensor`` (reciprocal, then product) differed in about a quarter of the blocks."""
    for bits in (8, 4):
        for dtype in DTYPES:
            g = torch.Generator().manual_seed(bits)
            for x in (
                (torch.randn(4, 3000, generator=g) * 3).to(dtype),
                (torch.rand(2, 4096, generator=g) * 1e-3 + 1e-4).to(dtype),
                _edge_rows(dtype, bits, 256, 6),
            ):
                want, want_scales = _ieee_reference(x, bits, 256)
                codes, scales = REF.quantize(x, bits, 256)
                assert torch.equal(scales, want_scales)
                got = _ints(codes, bits, x.shape[-1])
                assert torch.equal(got, want.int()), _mismatch(x, got, want, bits, 256, True)


def test_triton_kernels_match_the_fallback_on_cpu_tensors():
    """The Triton kernels themselves (launched directly; on CPU tensors under the interpreter
    the conftest enables), against the fallback: same layout, packing and masks, same codes."""
    if not ds_kernels.op_status("quantizer").compatible:
        pytest.skip("needs Triton (GPU or TRITON_INTERPRET=1)")
    from ds_kernels import _quant_triton as qt

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for bits, block in ((8, 64), (4, 64), (4, 256)):
        for dtype in DTYPES:
            inputs = [
                (torch.randn(3, n, generator=torch.Generator().manual_seed(n)) * 3).to(dtype)
                for n in (1, 7, 64, 65, 300)
            ]
            inputs += [_edge_rows(dtype, bits, block, 4), torch.zeros(2, 70, dtype=dtype)]
            for x in inputs:
                x = x.to(device)
                n = x.shape[-1]
                codes, scales = qt.quantize_rows(x, bits, block)
                ref_codes, ref_scales = REF.quantize(x, bits, block)
                assert torch.equal(scales, ref_scales)
                assert torch.equal(codes, ref_codes), _mismatch(x, codes, ref_codes, bits, block)
                back = qt.dequantize_rows(codes, scales, bits, block, n, dtype)
                ref_back = REF.dequantize(codes, scales, bits, block, n, dtype)
                if dtype is torch.bfloat16 and device == "cpu":
                    # the interpreter truncates fp32 to bf16 (a GPU rounds to nearest-even):
                    # within one bf16 ulp of the value, towards zero
                    diff = (back.float() - ref_back.float()).abs()
                    assert bool((diff <= ref_back.float().abs() * 2**-7).all())
                    assert bool((back.float().abs() <= ref_back.float().abs()).all())
                else:
                    assert torch.equal(back, ref_back)


def test_non_finite_and_tiny_blocks_match_the_fallback():
    """NaN and infinities survive quantization (non-finite scale, so the whole block comes back
    non-finite: an fp16 overflow in a gradient stays visible to the loss scaler after qgZ) and
    blocks below ``TINY`` are stored as zeros, in the Triton kernels (on CPU tensors under the
    interpreter, or on a GPU) as in the fallback."""
    if not ds_kernels.op_status("quantizer").compatible:
        pytest.skip("needs Triton (GPU or TRITON_INTERPRET=1)")
    from ds_kernels import _quant_triton as qt

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for bits, block in ((8, 64), (4, 64)):
        for dtype in DTYPES:
            x = _special_rows(dtype, block).to(device)
            codes, scales = qt.quantize_rows(x, bits, block)
            back = qt.dequantize_rows(codes, scales, bits, block, x.shape[-1], dtype)
            _check_special(x, codes, scales, back, bits, block)


def test_inputs_of_more_rows_than_a_grid_holds_are_launched_in_slices(monkeypatch):
    """Past ``MAX_GRID_ROWS`` rows (a CUDA grid's second axis) quantize and dequantize launch
    once per slice of rows: here with the limit lowered to 2, 5 rows in 3 launches, against the
    fallback, default and persistent launches alike."""
    if not ds_kernels.op_status("quantizer").compatible:
        pytest.skip("needs Triton (GPU or TRITON_INTERPRET=1)")
    from ds_kernels import _quant_triton as qt

    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setattr(qt, "MAX_GRID_ROWS", 2)
    assert [c for c, _ in qt._row_chunks(5, torch.zeros(5, 1))] == [2, 2, 1]
    x = (torch.randn(5, 300, generator=torch.Generator().manual_seed(5)) * 3).to(device)
    for bits in (8, 4):
        ref_codes, ref_scales = REF.quantize(x, bits, 64)
        codes, scales = qt.quantize_rows(x, bits, 64)
        assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)
        persistent = qt.Launch(32, programs_per_sm=1)
        codes, scales = qt.quantize_rows(x, bits, 64, persistent)
        assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)
        back = qt.dequantize_rows(codes, scales, bits, 64, 300, torch.float32)
        assert torch.equal(back, REF.dequantize(codes, scales, bits, 64, 300, torch.float32))


def test_op_launches_match_the_fallback_in_every_shape(monkeypatch):
    """``QuantizerKernels``, what the op launches with (outputs allocated in their final shape,
    launch plans kept per shape): 0-d, 1-D and 3-D inputs, a row that is not 16-byte aligned,
    and more rows than a grid holds (limit lowered to 2), against the fallback; each shape's
    plan is built once."""
    if not ds_kernels.op_status("quantizer").compatible:
        pytest.skip("needs Triton (GPU or TRITON_INTERPRET=1)")
    from ds_kernels import _quant_triton as qt

    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setattr(qt, "MAX_GRID_ROWS", 2)
    kernels = qt.QuantizerKernels()
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(2, 5, 97, generator=gen) * 3
    inputs = [base[0, 0, 0].clone(), base[0, 0], base, base.flatten()[1:98]]
    for dtype in (torch.float32, torch.bfloat16):
        for x in inputs:
            x = x.to(dtype).to(device)
            for bits in (8, 4):
                codes, scales = kernels.quantize(x, bits, 64)
                ref_codes, ref_scales = REF.quantize(x, bits, 64)
                assert codes.shape == ref_codes.shape and scales.shape == ref_scales.shape
                assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)
                n = x.shape[-1] if x.dim() else 1
                back = kernels.dequantize(codes, scales, bits, 64, n, torch.float32)
                assert torch.equal(back, REF.dequantize(codes, scales, bits, 64, n))
                into = torch.empty(back.numel(), device=device)  # out=: written in place
                assert kernels.dequantize(codes, scales, bits, 64, n, torch.float32, into) is into
                assert torch.equal(into, back.flatten())
    # 4 kernels x (n=1 one row, n=97 one row, n=97 two-row chunks of 10 rows, and one row);
    # on a GPU the first-call check of the direct launches plans shapes of other block sizes
    assert len([key for key in kernels.plans if key[1] == 64]) == 4 * 3
    if device == "cpu":  # the interpreter never launches directly
        assert all(not launcher.direct for launcher in kernels.launchers.values())


def _variant_launches(persistent, gpu):
    """Launch variants of the quantize kernels (``_quant_triton.Launch``): cache hints and other
    blocks per program, the absmax reduced in fp32, or persistent grids with 1 to 4 pipeline
    stages, with and without hints. Under Triton's interpreter (``gpu`` False) the ways of
    making codes all run the same operations and a pipelined loop runs as a plain one, so
    those variants are left to the GPU run."""
    from ds_kernels._quant_triton import Launch

    if not persistent:
        out = [
            Launch(64, evict=True),
            Launch(32, blocks_per_program=2, evict=True),
            Launch(64, wide_absmax=True),
            Launch(64, max_registers=64),
            Launch(64, unmasked=True),
            Launch(32, blocks_per_program=2, unmasked=True, evict=True),
        ]
        if gpu:
            out += [Launch(64, codes="floor"), Launch(64, codes="rmi"),
                    Launch(32, blocks_per_program=2, codes="rmi", evict=True)]  # fmt: skip
        return out
    out = [
        Launch(16, blocks_per_program=2, programs_per_sm=2, stages=3, wide_absmax=True),
        Launch(32, programs_per_sm=3, stages=2, unmasked=True),
    ]
    for stages in (1, 2, 3, 4) if gpu else (1, 2):
        for g in (1, 3, 64):  # 64 x 2 SMs: a grid capped at the tile count
            out.append(Launch(32, programs_per_sm=g, stages=stages, evict=stages % 2 == 0))
    return out


def _interpreter_loop_error(exc: Exception) -> bool:
    """Triton's interpreter up to 3.6 at least takes a runtime loop bound (a program id, a size
    argument) as ``int()`` of a one-element array, which NumPy 2.4 refuses."""
    return os.environ.get("TRITON_INTERPRET") == "1" and "0-dimensional" in str(exc)


@pytest.mark.parametrize("persistent", [False, True], ids=["hints", "persistent"])
def test_launch_variants_match_the_default_launch(persistent):
    """Every launch variant (cache hints, persistent grids looping over tiles across rows,
    software-pipelined or not) writes bit for bit the default launch's codes and scales, into
    outputs first filled with a value no launch writes (code -128 / byte 0x88, scale NaN), for
    rows shorter than, equal to and not a multiple of the block or the tile, several rows."""
    if not ds_kernels.op_status("quantizer").compatible:
        pytest.skip("needs Triton (GPU or TRITON_INTERPRET=1)")
    from ds_kernels import _quant_triton as qt
    from ds_kernels._quant_op import code_numel, num_blocks

    device = "cuda" if torch.cuda.is_available() else "cpu"
    launches = _variant_launches(persistent, device == "cuda")
    # under the interpreter fp16 and bf16 take the same paths (16-bit loads, the absmax
    # before or after widening): one of them suffices there, both run on the GPU
    dtypes = DTYPES if device == "cuda" else [torch.float32, torch.bfloat16]
    # (bits, block): int8 with 4096-value blocks (BPP 1) and small blocks (BPP 64), int4 with
    # qgZ's 256-value blocks (BPP 16) and small ones
    cases = {(8, 4096): [(1, 7), (3, 4096), (2, 2 * 4096 + 70)], (8, 64): [(3, 300)],
             (4, 256): [(3, 300), (2, 4096 + 257), (1, 3 * 4096)], (4, 64): [(5, 65)]}  # fmt: skip
    for (bits, block), shapes in cases.items():
        for dtype in dtypes:
            for rows, n in shapes:
                g = torch.Generator().manual_seed(rows * n + bits)
                x = ((torch.randn(rows, n, generator=g) * 3).to(dtype)).to(device)
                want_codes, want_scales = qt.quantize_rows(x, bits, block)
                for launch in launches:
                    codes = torch.full((rows, code_numel(n, bits)), -128 if bits == 8 else 0x88,
                                       dtype=want_codes.dtype, device=device)  # fmt: skip
                    scales = torch.full((rows, num_blocks(n, block)), float("nan"), device=device)
                    try:
                        qt.quantize_into(x, codes, scales, bits, block, launch, sms=2)
                    except Exception as exc:  # noqa: BLE001
                        if _interpreter_loop_error(exc):
                            pytest.skip(f"this Triton's interpreter runs no runtime loop: {exc}")
                        raise
                    what = f"{launch} bits={bits} block={block} {dtype} {rows}x{n}"
                    assert torch.equal(scales, want_scales), what
                    assert torch.equal(codes, want_codes), (
                        what + ": " + _mismatch(x, codes, want_codes, bits, block)
                    )


def test_launch_settings():
    """The default launch (one program per tile, grid = (tiles a row, rows), warps from the
    values per thread) and a persistent one (grid = programs per SM x SMs, at most the tile
    count)."""
    if not ds_kernels.op_status("quantizer").compatible:
        pytest.skip("needs Triton (GPU or TRITON_INTERPRET=1)")
    from ds_kernels._quant_triton import (
        _CODES,
        _DEFAULT_LAUNCH,
        _PLAIN_CODES,
        Launch,
        _interpreted,
        _launch,
    )

    assert all(launch.plain for launch in _DEFAULT_LAUNCH.values())
    grid, kw = _launch(4096, 10, 3, 8)
    assert grid == (10, 3) and kw["BPP"] == 1 and kw["num_warps"] == 2 and "ntiles" not in kw
    assert "nbp" not in kw and "CODES" not in _launch(4096, 10, 3)[1]
    # the interpreter has no libdevice: it floors and converts
    assert kw["CODES"] == (0 if _interpreted() else _CODES[_PLAIN_CODES])
    assert _launch(4096, 10, 3)[1]["MAGIC"]
    fc = _launch(4096, 10, 3, 8, Launch(64, codes="floor"))[1]
    assert fc["CODES"] == 0 and fc["ntiles"] == 30
    rmi = _launch(4096, 10, 3, 8, Launch(64, codes="rmi"))[1]
    assert rmi["CODES"] == (0 if _interpreted() else 1)
    grid, kw = _launch(256, 33, 2, 4)  # 8 blocks a tile: 5 tiles a row
    assert grid == (5, 2) and kw["BPP"] == 8 and kw["num_warps"] == 2
    grid, kw = _launch(4096, 3, 2, 4)  # a tile is at least one block
    assert grid == (3, 2) and kw["BPP"] == 1 and kw["num_warps"] == 4
    assert _launch(256, 33, 2, 4, Launch(32, tile_values=4096))[1]["BPP"] == 16
    assert _launch(4096, 1, 1, 0)[1]["num_warps"] == 8
    persist = Launch(32, programs_per_sm=4, stages=3)
    grid, kw = _launch(4096, 1000, 2, 8, persist, sms=132)
    assert grid == (528,) and kw["ntiles"] == 2000 and kw["PERSISTENT"] and kw["STAGES"] == 3
    assert kw["num_warps"] == 4 and not kw["EVICT"] and not kw["WIDE"]
    grid, kw = _launch(4096, 10, 3, 8, Launch(64, wide_absmax=True))
    assert (
        grid == (10, 3)
        and kw["ntiles"] == 30
        and kw["WIDE"]
        and not kw["PERSISTENT"]
        and kw["num_warps"] == 2
    )
    assert _launch(4096, 100, 2, 8, persist, sms=132)[0] == (200,)  # capped at the tile count
    with pytest.raises(ValueError):
        _launch(4096, 100, 2, 8, persist)  # no SM count
    with pytest.raises(ValueError):
        _launch(4096, 100, 2, 0, Launch(16, evict=True))  # dequantize has no variants
    grid, kw = _launch(4096, 10, 3, 8, Launch(64, max_registers=64))
    assert grid == (10, 3) and kw["maxnreg"] == 64 and not kw["WIDE"]
    assert "maxnreg" not in _launch(4096, 10, 3, 8, Launch(64, evict=True))[1]
    # masks dropped only where every tile is full
    assert _launch(4096, 10, 3, 8, Launch(64, unmasked=True), n=10 * 4096)[1]["EVEN"]
    assert not _launch(4096, 10, 3, 8, Launch(64, unmasked=True), n=10 * 4096 - 1)[1]["EVEN"]
    assert not _launch(256, 33, 2, 4, Launch(32, unmasked=True), n=33 * 256)[1]["EVEN"]
    assert not _launch(4096, 10, 3, 8, Launch(64, evict=True), n=10 * 4096)[1]["EVEN"]
    bad_launches = (dict(stages=2), dict(programs_per_sm=1, stages=5), dict(programs_per_sm=-1),
                    dict(max_registers=8), dict(max_registers=256), dict(codes="round"))  # fmt: skip
    for bad in bad_launches:
        with pytest.raises(ValueError):
            Launch(32, **bad)


# Compiles every quantizer kernel once for an H100 (sm_90; Triton's own ptxas, no GPU needed),
# for each dtype and (bits, block) pair, with the divisibility hints a launch with 16-byte
# aligned pointers and sizes divisible by 16 specialises on, and prints per kernel its
# arithmetic instructions ("arith ...") and its global loads and stores ("access ..."); then the
# same for the launch variants of the quantize kernels, one line each ("variant ...").
_PTX_SCRIPT = textwrap.dedent(
    """
    import inspect, re, sys
    import triton
    from triton.compiler import ASTSource
    from triton.backends.compiler import GPUTarget
    from ds_kernels import _quant_triton as qt

    params = inspect.signature(ASTSource).parameters
    if "constexprs" not in params:
        print("SKIP Triton", triton.__version__, "has the older ASTSource API"); sys.exit(0)
    if "attrs" not in params:
        print("NOATTRS Triton", triton.__version__, "takes no divisibility hints")

    def ptx(fn, sig, block, quant_bits):  # launched as _launch launches it
        bpp = qt._DEFAULT_LAUNCH[quant_bits].blocks(block)
        hints = {}
        if "attrs" in params:
            hints["attrs"] = {(i,): [["tt.divisibility", 16]] for i, k in enumerate(sig)
                              if k.endswith("_ptr") or k in ("n", "c", "nb")}
        consts = {"BLOCK": block, "BPP": bpp,
                  **qt._launch(block, 1, 1, quant_bits)[1]}
        consts = {k: consts[k] for k in ("BLOCK", "BPP", "CODES", "MAGIC") if k in consts}
        sig = {**sig, **{k: "constexpr" for k in consts}}
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, **hints)
        opts = {"num_warps": qt._launch(block, 1, 1, quant_bits)[1]["num_warps"], **qt._LAUNCH}
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm["ptx"]

    for dt in ("*fp32", "*fp16", "*bf16"):
        for bits, block in ((8, 4096), (8, 256), (4, 256), (4, 64)):
            cnt = {} if bits == 8 else {"c": "i32"}
            ty = "*i8" if bits == 8 else "*u8"
            sizes = {"n": "i32", **cnt, "nb": "i32"}
            q = ptx(qt._quant8_kernel if bits == 8 else qt._quant4_kernel,
                    {"x_ptr": dt, "q_ptr": ty, "s_ptr": "*fp32", **sizes}, block, bits)
            d = ptx(qt._dequant8_kernel if bits == 8 else qt._dequant4_kernel,
                    {"q_ptr": ty, "s_ptr": "*fp32", "out_ptr": dt, **sizes}, block, 0)
            for name, text in (("quant", q), ("dequant", d)):
                arith = re.findall(r"^\\s*((?:div|fma|mul|add|cvt|rcp|max|rem)\\.[\\w.]+)", text, re.M)
                access = re.findall(r"((?:ld|st)\\.global[\\w.]*)", text)
                print("arith", dt, bits, block, name, " ".join(sorted(set(arith))))
                if "attrs" in params:
                    print("access", dt, bits, block, name, " ".join(sorted(set(access))))

    # the launch variants, as _launch launches them: "variant dt bits block stages evict | arith
    # ops | loads and stores" (with the cache qualifiers)
    variants = (qt.Launch(64, evict=True), qt.Launch(32, programs_per_sm=4),
                qt.Launch(32, programs_per_sm=4, stages=3, evict=True),
                qt.Launch(64, programs_per_sm=8, stages=4))
    for dt in ("*fp32", "*fp16", "*bf16"):
        for bits, block in ((8, 4096), (4, 256)):
            cnt = {} if bits == 8 else {"c": "i32"}
            ty = "*i8" if bits == 8 else "*u8"
            sig = {"x_ptr": dt, "q_ptr": ty, "s_ptr": "*fp32", "n": "i32", **cnt, "nb": "i32",
                   "nbp": "i32", "ntiles": "i32"}
            hints = {}
            if "attrs" in params:
                hints["attrs"] = {(i,): [["tt.divisibility", 16]] for i, k in enumerate(sig)
                                  if k.endswith("_ptr") or k in ("n", "c", "nb")}
            for launch in variants:
                kw = qt._launch(block, 1, 1, bits, launch, sms=1)[1]
                consts = {k: kw[k] for k in
                          ("BLOCK", "BPP", "PERSISTENT", "STAGES", "EVICT", "WIDE", "EVEN", "CODES")}
                fn = qt._quant8_variant_kernel if bits == 8 else qt._quant4_variant_kernel
                src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}},
                                constexprs=consts, **hints)
                opts = {"num_warps": kw["num_warps"], **qt._LAUNCH}
                text = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
                text = text.asm["ptx"]
                arith = re.findall(r"^\\s*((?:div|fma|mul|add|cvt|rcp|max|rem)\\.[\\w.]+)", text, re.M)
                access = re.findall(r"((?:ld|st)\\.global[\\w.:]*|cp\\.async\\.[\\w.:]*)", text)
                print("variant", dt, bits, block, launch.stages, int(launch.evict), "|",
                      " ".join(sorted(set(arith))), "|", " ".join(sorted(set(access))))
    """
)


@pytest.fixture(scope="module")
def sm90_ptx() -> list[str]:
    """The output lines of _PTX_SCRIPT, run once for the module in a fresh process (the
    compiler, not the interpreter, of Triton); a skip where Triton's compiler is missing or too
    old."""
    try:
        import triton  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"needs Triton's compiler: {exc}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env["TRITON_CACHE_DIR"] = os.path.join(os.environ["DS_KERNELS_CACHE"], "triton")
    proc = subprocess.run(
        [sys.executable, "-c", _PTX_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    if proc.stdout.startswith("SKIP"):
        pytest.skip(proc.stdout.strip())
    return proc.stdout.strip().splitlines()


def _ptx_lines(lines: list[str], tag: str) -> list[str]:
    """The lines of one kind, without the tag: ``dtype bits block kernel op...``."""
    return [line.split(" ", 1)[1] for line in lines if line.startswith(tag + " ")]


def _float_max_ops(ops: list[str]) -> list[str]:
    return [o for o in ops if o.startswith("max.") and o.split(".")[-1][:1] in "fb"]


def _check_code_instructions(ops: list[str], line: str) -> None:
    """The default way of making integer codes (``_quant_triton._PLAIN_CODES``): one
    ``cvt.rmi.s32.f32``, or (``magic``) an ``add.rm.f32`` and no float-to-int conversion."""
    from ds_kernels._quant_triton import _PLAIN_CODES

    if _PLAIN_CODES == "rmi":
        assert {"cvt.rmi.s32.f32", "cvt.rmi.ftz.s32.f32"} & set(ops), line
    else:
        assert {"add.rm.f32", "add.rm.ftz.f32"} & set(ops), line
        assert not [o for o in ops if o.startswith("cvt.") and ".s32.f32" in o], line


def test_kernels_compile_to_ieee_division_and_no_fma(sm90_ptx):
    """Reads the sm_90 PTX of every kernel: quantize divides with ``div.rn`` (not the approximate
    ``div.full`` of Triton's ``/``), multiplies and adds with explicit round-to-nearest
    (``mul.rn``/``add.rn``, which ptxas never fuses) and has no ``fma``, reduces the absmax
    with NaN-propagating ``max.NaN`` only (``tl.max`` would skip a NaN) and floors to an integer
    code with one ``add.rm`` (or ``cvt.rmi``); dequantize makes codes fp32 without a conversion instruction and
    narrows with ``cvt.rn`` (one value or a packed pair).
    No kernel divides integers (the 2-D grid gives row and tile directly)."""
    lines = _ptx_lines(sm90_ptx, "arith")
    assert len(lines) == 24, sm90_ptx
    for line in lines:
        dt, bits, block, kind, *ops = line.split()
        assert not [o for o in ops if o.startswith(("fma.", "div.full", "div.approx", "rcp."))], (
            line
        )
        assert not [o for o in ops if o.startswith(("rem.", "div.s", "div.u"))], line
        assert "mul.rn.f32" in ops, line
        if kind == "quant":
            # Triton 3.5 emits div.rn.ftz: the same quotients, as blocks below TINY (where the
            # scale would be subnormal) are stored as zeros (_quant_triton)
            assert {"div.rn.f32", "div.rn.ftz.f32"} & set(ops) and "add.rn.f32" in ops, line
            maxes = _float_max_ops(ops)
            assert maxes and all(".NaN." in o for o in maxes), line
            _check_code_instructions(ops, line)
            continue
        # dequantize: codes to fp32 by the exponent trick, not an int-to-float conversion
        assert not [o for o in ops if o.startswith("cvt.") and ".f32.s" in o], line
        assert not [o for o in ops if o.startswith("cvt.") and ".f32.u" in o], line
        if dt != "*fp32":
            # one value per cvt, or two packed (``f16x2``): round-to-nearest either way
            narrow = dt[1:].replace("fp", "f")
            assert {f"cvt.rn.{narrow}.f32", f"cvt.rn.{narrow}x2.f32"} & set(ops), line


def test_kernels_compile_to_wide_global_accesses(sm90_ptx):
    """Values and codes move in 8- or 16-byte global loads and stores (``v2``/``v4``) for every
    block size, int4 included: one program per small block, or int4 nibbles read at stride 2,
    compiled to 1- and 2-byte accesses, far from the memory bandwidth. The only scalar 4-byte
    accesses left are the per-block scales (``b32``)."""
    if sm90_ptx[0].startswith("NOATTRS"):
        pytest.skip(sm90_ptx[0])
    lines = _ptx_lines(sm90_ptx, "access")
    assert len(lines) == 24, sm90_ptx
    for line in lines:
        ops = line.split()[4:]
        narrow = [o for o in ops if o.split(".")[-1] in ("b8", "b16")]
        assert not narrow, line
        assert any(".v2." in o or ".v4." in o for o in ops if o.startswith("ld.")), line
        assert any(".v2." in o or ".v4." in o for o in ops if o.startswith("st.")), line


def test_launch_variants_compile_to_the_same_arithmetic_with_their_memory_hints(sm90_ptx):
    """The variant kernels' sm_90 PTX: the default's IEEE arithmetic (no fma, ``div.rn``); with
    divisibility hints, a pipelined persistent loop (stages > 1) loads by ``cp.async`` and a
    plain one by wide ``ld.global``, ``evict`` loads ``evict_first`` and stores the codes
    ``.cs``."""
    lines = _ptx_lines(sm90_ptx, "variant")
    assert len(lines) == 24, sm90_ptx
    for line in lines:
        head, arith, access = (part.split() for part in line.split(" | "))
        dt, bits, block, stages, evict = head
        assert not [o for o in arith if o.startswith(("fma.", "div.full", "div.approx", "rcp."))]
        assert {"div.rn.f32", "div.rn.ftz.f32"} & set(arith), line
        assert {"mul.rn.f32", "add.rn.f32"} <= set(arith), line
        maxes = _float_max_ops(arith)
        assert maxes and all(".NaN." in o for o in maxes), line
        if sm90_ptx[0].startswith("NOATTRS"):
            continue
        loads = [o for o in access if not o.startswith("st.")]
        stores = [o for o in access if o.startswith("st.")]
        if int(stages) > 1:
            assert any(o.startswith("cp.async") for o in loads), line
        else:
            assert loads and all(".v4." in o or ".v2." in o for o in loads), line
            if evict == "1":
                assert all("evict_first" in o for o in loads), line
        assert any(".cs." in o for o in stores) == (evict == "1"), line


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_kernels_match_the_reference(bits, dtype):
    """On the GPU: codes, scales and dequantized values bit-identical to the torch reference run
    on the same GPU and on the CPU, including values on and next to every rounding edge."""
    op = ds_kernels.load("quantizer")
    assert op.backend is ds_kernels.Backend.TRITON, op.detail
    block = 4096
    inputs = [torch.randn(3, n, device="cuda").to(dtype) * 3 for n in (1, 7, 4095, 4096, 4097)]
    inputs += [torch.randn(3, 100_003, device="cuda").to(dtype) * 3]
    inputs += [_edge_rows(dtype, bits, block, 3).cuda(), torch.zeros(2, 5000, dtype=dtype).cuda()]
    special = _special_rows(dtype, block).cuda()
    codes, scales = op.quantize(special, bits, block)
    back = op.dequantize(codes, scales, bits, block, special.shape[-1], dtype)
    _check_special(special, codes, scales, back, bits, block)
    for x in inputs:
        n = x.shape[-1]
        codes, scales = op.quantize(x, bits, block)
        rc, rs = REF.quantize(x, bits, block)
        cpu_codes, cpu_scales = REF.quantize(x.cpu(), bits, block)
        assert torch.equal(scales, rs)
        assert torch.equal(rs.cpu(), cpu_scales)
        assert torch.equal(codes, rc), _mismatch(x, codes, rc, bits, block)
        assert torch.equal(rc.cpu(), cpu_codes), _mismatch(x, rc, cpu_codes, bits, block)
        back = op.dequantize(codes, scales, bits, block, n, dtype)
        ref_back = REF.dequantize(rc, rs, bits, block, n, dtype)
        assert torch.equal(back, ref_back), int((back != ref_back).sum())
        # the bound: half a code step, plus the output dtype's rounding
        step = rs.repeat_interleave(block, dim=1)[:, :n]
        err = (back.float() - x.float()).abs()
        fi = torch.finfo(dtype)
        bound = step / 2 * (1 + 1e-5) + x.float().abs() * fi.eps + fi.tiny
        assert bool((err <= bound).all())


@pytest.mark.gpu
def test_gpu_direct_launches_match_the_jit_launches():
    """On the GPU: the op's launches straight into the compiled kernels (where this Triton's
    launch convention is the one ``_triton_launch`` follows) give the same codes, scales and
    values, bit for bit, as launches through Triton's JIT, for every dtype, both widths,
    aligned and misaligned inputs and row lengths that Triton specializes differently; and
    the direct path really runs."""
    import triton

    from ds_kernels._quant_op import TritonQuantizer
    from ds_kernels._triton_launch import direct_launch_supported

    op, jit = TritonQuantizer(), TritonQuantizer(direct=False)
    gen = torch.Generator(device="cuda").manual_seed(11)
    base = torch.randn(4, 8209, device="cuda", generator=gen) * 3
    for dtype in DTYPES:
        whole = base.to(dtype)
        flat = whole.flatten()
        inputs = [whole, whole[:, :4096].contiguous(), flat[1:4097], flat[8 : 8 + 1], flat[3:300]]
        for bits, block in ((8, 4096), (4, 256)):
            for x in inputs:
                for _ in range(2):  # the second call of each specialization launches directly
                    codes, scales = op.quantize(x, bits, block)
                    want_codes, want_scales = jit.quantize(x, bits, block)
                    assert torch.equal(codes, want_codes) and torch.equal(scales, want_scales)
                    n = x.shape[-1]
                    back = op.dequantize(codes, scales, bits, block, n, dtype)
                    assert torch.equal(back, jit.dequantize(codes, scales, bits, block, n, dtype))
                    into = torch.empty(back.numel(), dtype=dtype, device="cuda")
                    assert op.dequantize(codes, scales, bits, block, n, dtype, into) is into
                    assert torch.equal(into, back.flatten())
    launchers = op.kernels().launchers.values()
    if direct_launch_supported(triton):
        assert all(launcher.direct_launches > 0 for launcher in launchers)
    else:
        assert all(launcher.direct_launches == 0 for launcher in launchers)
    assert all(launcher.direct_launches == 0 for launcher in jit.kernels().launchers.values())


def test_direct_launches_that_fail_their_check_are_turned_off_with_a_warning():
    """A ``QuantizerKernels`` told to launch directly where that cannot work (under Triton's
    interpreter, whose kernels have no compiled launcher) fails its first-call check, warns,
    and launches through Triton's JIT from then on, with right results."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the interpreter is the Triton where direct launches cannot work")
    from ds_kernels import _quant_triton as qt

    kernels = qt.QuantizerKernels(direct=True)
    x = (torch.randn(2, 300, generator=torch.Generator().manual_seed(2)) * 3).to(torch.float32)
    with pytest.warns(RuntimeWarning, match="launching through Triton's JIT instead"):
        codes, scales = kernels.quantize(x, 8, 64)
    assert all(not launcher.direct for launcher in kernels.launchers.values())
    ref_codes, ref_scales = REF.quantize(x, 8, 64)
    assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # checked once: no second warning
        kernels.quantize(x, 4, 64)
