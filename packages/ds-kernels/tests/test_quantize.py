"""Block-wise quantize/dequantize: layout, round-trip error bounds (property-tested), GPU kernels
against the pure-PyTorch reference."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ds_kernels
from ds_kernels._quant_op import QMAX, TorchQuantizer

REF = TorchQuantizer()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# the output dtype's own rounding on top of the quantization error (half an ulp, relative)
EPS = {torch.float32: 2**-24, torch.float16: 2**-11, torch.bfloat16: 2**-8}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ds_kernels.KernelBuildWarning)
        yield


def _check_bound(x, bits, block):
    codes, scales = ds_kernels.quantize_blockwise(x, bits=bits, block=block)
    n = x.shape[-1]
    assert codes.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert codes.shape[-1] == (n if bits == 8 else (n + 1) // 2)
    assert scales.dtype == torch.float32 and scales.shape[-1] == -(-n // block)
    back = ds_kernels.dequantize_blockwise(
        codes, scales, bits=bits, block=block, numel=n, dtype=x.dtype
    )
    assert back.shape == x.shape and back.dtype == x.dtype and back.is_contiguous()
    xf = x.float().reshape(-1, n)
    nb = scales.shape[-1]
    per_elem = scales.reshape(-1, nb).repeat_interleave(block, dim=1)[:, :n]
    # scale = absmax / qmax exactly where the block's absmax lives
    absmax = torch.nn.functional.pad(xf.abs(), (0, nb * block - n)).view(-1, nb, block).amax(-1)
    torch.testing.assert_close(scales.reshape(-1, nb), absmax / QMAX[bits], rtol=1e-6, atol=0)
    err = (back.float().reshape(-1, n) - xf).abs()
    # the output dtype rounds too: half an ulp of the value, or of the subnormal step
    fi = torch.finfo(x.dtype)
    bound = per_elem / 2 * (1 + 1e-5) + xf.abs() * EPS[x.dtype] * 2 + fi.tiny * fi.eps
    assert bool((err <= bound).all()), float((err - bound).max())


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 3000),
    rows=st.integers(1, 3),
    bits=st.sampled_from([8, 4]),
    block=st.sampled_from([2, 16, 64, 256, 1024]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
    magnitude=st.sampled_from([1e-6, 1.0, 1e3]),
)
def test_round_trip_error_bound(n, rows, bits, block, dtype, seed, magnitude):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, n, generator=g) * magnitude).to(dtype)
    if rows == 1:
        x = x.reshape(n)  # 1-D input: one row
    _check_bound(x, bits, block)


@given(n=st.integers(1, 600), bits=st.sampled_from([8, 4]))
@settings(max_examples=30, deadline=None)
def test_codes_are_exact_for_representable_values(n, bits):
    # values that are integer multiples of absmax/qmax come back exactly
    qmax = QMAX[bits]
    g = torch.Generator().manual_seed(n)
    ints = torch.randint(-qmax, qmax + 1, (n,), generator=g).float()
    ints[0] = qmax  # absmax of the (only) block is qmax * 0.25
    x = ints * 0.25
    codes, scales = ds_kernels.quantize_blockwise(x, bits=bits, block=1024)
    back = ds_kernels.dequantize_blockwise(codes, scales, bits=bits, block=1024, numel=n)
    assert torch.equal(back, x)


def test_zero_block_and_symmetric_range():
    x = torch.zeros(10)
    codes, scales = ds_kernels.quantize_blockwise(x, block=4)
    assert torch.equal(scales, torch.zeros(3)) and torch.equal(
        codes, torch.zeros(10, dtype=torch.int8)
    )
    x = torch.tensor([-1.0, 1.0, -0.5, 0.0])
    codes, _ = ds_kernels.quantize_blockwise(x, bits=8, block=4)
    assert codes.tolist() == [-127, 127, -63, 0]  # floor(-63.5 + 0.5) = -63
    codes4, _ = ds_kernels.quantize_blockwise(x, bits=4, block=4)
    # int4 codes -7, 7, -3, 0 packed low nibble first: 0x79 (7<<4 | 9), 0x0D (0<<4 | 13)
    assert codes4.tolist() == [0x79, 0x0D]


def test_non_finite_blocks_stay_non_finite_and_tiny_blocks_are_zero():
    # blocks of 2: ordinary, NaN, +inf, below TINY (stored as zeros), at TINY (kept)
    tiny = 2.0**-119
    x = torch.tensor([1.0, -0.5, float("nan"), 2.0, 3.0, float("inf"), 1e-37, -4e-37, tiny, 0.0])
    for bits in (8, 4):
        codes, scales = ds_kernels.quantize_blockwise(x, bits=bits, block=2)
        qmax = QMAX[bits]
        assert scales[0] == torch.tensor(1.0) / qmax and scales[1].isnan()
        assert scales[2] == float("inf") and scales[3] == 0
        assert scales[4] == torch.tensor(tiny) / qmax
        back = ds_kernels.dequantize_blockwise(codes, scales, bits=bits, block=2, numel=10)
        assert not bool(back[2:6].isfinite().any())
        assert back[6:8].tolist() == [0.0, 0.0] and back[8] == tiny and back[9] == 0
        assert back[0] == 1.0


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        ds_kernels.quantize_blockwise(torch.ones(4), bits=2)
    with pytest.raises(ValueError, match="block must be a power of two"):
        ds_kernels.quantize_blockwise(torch.ones(4), block=100)
    codes, scales = ds_kernels.quantize_blockwise(torch.ones(9), bits=4, block=4)
    with pytest.raises(ValueError, match="do not describe"):
        ds_kernels.dequantize_blockwise(codes, scales, bits=4, block=4, numel=3)


def test_dequantize_into_out_writes_there_and_checks_it():
    """``out=``: the values land in the given tensor (any shape of as many elements, contiguous
    or not), equal to a plain dequantize; a wrong size, dtype or device is refused by name."""
    x = torch.randn(3, 70, generator=torch.Generator().manual_seed(3)) * 2
    for bits, dtype in ((8, torch.bfloat16), (4, torch.bfloat16), (8, torch.float32)):
        codes, scales = ds_kernels.quantize_blockwise(x, bits=bits, block=16)
        want = ds_kernels.dequantize_blockwise(
            codes, scales, bits=bits, block=16, numel=70, dtype=dtype
        )
        flat = torch.full((210,), 7.0, dtype=dtype)
        got = ds_kernels.dequantize_blockwise(
            codes, scales, bits=bits, block=16, numel=70, dtype=dtype, out=flat
        )
        assert got is flat and torch.equal(flat.view(3, 70), want)
        strided = torch.zeros(70, 3, dtype=dtype).t()  # (3, 70), not contiguous
        ds_kernels.dequantize_blockwise(
            codes, scales, bits=bits, block=16, numel=70, dtype=dtype, out=strided
        )
        assert torch.equal(strided, want)
        wrong_dtype = torch.float16 if dtype == torch.float32 else torch.float32
        for bad in (torch.empty(209, dtype=dtype), torch.empty(210, dtype=wrong_dtype)):
            with pytest.raises(ValueError, match="dequantize: out is"):
                ds_kernels.dequantize_blockwise(
                    codes, scales, bits=bits, block=16, numel=70, dtype=dtype, out=bad
                )


def test_op_is_registered_with_a_fallback():
    status = ds_kernels.op_status("quantizer")
    assert status.name == "quantizer"
    op = ds_kernels.load("quantizer")
    triton_here = ds_kernels.op_status("quantizer").compatible
    want = ds_kernels.Backend.TRITON if triton_here else ds_kernels.Backend.FALLBACK
    assert op.backend is want, op.detail
