"""On a GPU: the fused attention kernels CUDA picks (flash, memory-efficient, cuDNN) count as
the formula, in bf16, forward and backward; the device's peak is known for MFU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _profile_models import MLP, SDPA, B, H, mlp_input, mlp_macs
from torch.nn.attention import SDPBackend, sdpa_kernel

from ds_profile import FlopsProfiler

BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@pytest.mark.parametrize("causal", [False, True])
def test_fused_attention_kernels(backend, causal):
    L = 64
    q, k, v = (
        torch.randn(B, H, L, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )
    model = SDPA(causal)
    prof = FlopsProfiler(model)
    prof.start_profile()
    try:
        with sdpa_kernel([backend]):
            out = model(q, k, v)
    except RuntimeError as exc:  # this GPU or build has no such kernel
        prof.end_profile()
        pytest.skip(f"{backend.name}: {exc}")
    out.float().sum().backward()
    prof.stop_profile()
    pairs = L * (L + 1) // 2 if causal else L * L
    macs = B * H * pairs * (64 + 64)
    assert prof.get_total_macs() == macs
    assert prof.get_total_backward_macs() == 2 * macs
    prof.end_profile()


@pytest.mark.gpu
def test_mlp_bf16_on_cuda():
    model = MLP().cuda().to(torch.bfloat16)
    prof = FlopsProfiler(model)
    prof.start_profile()
    model(mlp_input().cuda().to(torch.bfloat16))
    prof.stop_profile()
    assert prof.get_total_macs() == mlp_macs()
    assert prof.get_total_duration() > 0
    prof.end_profile()


@pytest.mark.gpu
def test_linear_on_3d_input_cuda():
    a = torch.randn(4, 32, 16, device="cuda")
    model = torch.nn.Linear(16, 8).cuda()
    prof = FlopsProfiler(model)
    prof.start_profile()
    F.gelu(model(a))
    prof.stop_profile()
    assert prof.get_total_macs() == 4 * 32 * 16 * 8
    prof.end_profile()
