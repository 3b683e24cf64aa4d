"""The quantizer's Triton kernels against the pure-PyTorch reference: under Triton's interpreter
on CPU tensors (where Triton is installed) and on a GPU. No hypothesis here, so the GPU machine
(which may lack it) runs this module."""

import warnings

import pytest
import torch

import ds_kernels
from ds_kernels._quant_op import QMAX, TorchQuantizer

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


def test_triton_kernels_match_the_fallback_on_cpu_tensors():
    """The Triton kernels themselves (launched directly; on CPU tensors under the interpreter
    the conftest enables), against the fallback: same layout, packing and masks."""
    if not ds_kernels.op_status("quantizer").compatible:
        pytest.skip("needs Triton (GPU or TRITON_INTERPRET=1)")
    from ds_kernels import _quant_triton as qt

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for bits, block in ((8, 64), (4, 64), (4, 256)):
        for n in (1, 7, 64, 65, 300):
            for dtype in DTYPES:
                x = (torch.randn(3, n, generator=torch.Generator().manual_seed(n)) * 3).to(dtype)
                x = x.to(device)
                codes, scales = qt.quantize_rows(x, bits, block)
                ref_codes, ref_scales = REF.quantize(x, bits, block)
                torch.testing.assert_close(scales, ref_scales, rtol=1e-6, atol=0)
                unpack = (lambda c: c.int()) if bits == 8 else _unpack4
                # products exactly on a .5 edge may round the other way (interpreter: numpy)
                assert int((unpack(codes) - unpack(ref_codes)).abs().max()) <= 1
                back = qt.dequantize_rows(codes, scales, bits, block, n, dtype)
                ref_back = REF.dequantize(codes, scales, bits, block, n, dtype)
                # one ulp: the interpreter truncates when narrowing to 16-bit floats
                ulp = {torch.float32: 0.0, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
                diff = (back.float() - ref_back.float()).abs()
                assert bool((diff <= ref_back.float().abs() * ulp).all())


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_kernels_match_the_reference(bits, dtype):
    op = ds_kernels.load("quantizer")
    assert op.backend is ds_kernels.Backend.TRITON, op.detail
    for n in (1, 7, 4095, 4096, 4097, 100_003):
        x = torch.randn(3, n, device="cuda").to(dtype) * 3
        codes, scales = op.quantize(x, bits, 4096)
        rc, rs = REF.quantize(x, bits, 4096)
        torch.testing.assert_close(scales, rs, rtol=1e-6, atol=0)
        back = op.dequantize(codes, scales, bits, 4096, n, dtype)
        ref_back = REF.dequantize(rc, rs, bits, 4096, n, dtype)
        # a product exactly on a rounding edge may round differently: at most one code step
        step = rs.repeat_interleave(4096, dim=1)[:, :n]
        assert bool(((back.float() - ref_back.float()).abs() <= step * 1.01 + 1e-6).all())
        # the bound: half a code step, plus the output dtype's rounding
        err = (back.float() - x.float()).abs()
        fi = torch.finfo(dtype)
        bound = step / 2 * (1 + 1e-5) + x.float().abs() * fi.eps + fi.tiny
        assert bool((err <= bound).all())
        assert torch.equal(rs.view(3, -1)[:, 0], x.float()[:, :4096].abs().amax(1) / QMAX[bits])
