"""Peak FLOP/s lookup for MFU."""

from __future__ import annotations

import pytest
import torch

from ds_accel import ENV_PEAK, peak_flops


def test_table(monkeypatch):
    monkeypatch.delenv(ENV_PEAK, raising=False)
    assert peak_flops(torch.bfloat16, "NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops(torch.bfloat16, "NVIDIA H100 PCIe") == 756e12  # the PCIe card first
    assert peak_flops(torch.bfloat16, "NVIDIA H200") == 989e12
    assert peak_flops(torch.float16, "NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops(torch.bfloat16, "Tesla V100-SXM2-32GB") is None  # no bf16 tensor cores
    assert peak_flops(torch.bfloat16, "Some New Chip") is None


def test_fp32_is_tf32_when_allowed(monkeypatch):
    monkeypatch.delenv(ENV_PEAK, raising=False)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert peak_flops(torch.float32, "NVIDIA A100-SXM4-40GB") == 19.5e12
        torch.set_float32_matmul_precision("high")
        assert peak_flops(torch.float32, "NVIDIA A100-SXM4-40GB") == 156e12
    finally:
        torch.set_float32_matmul_precision(before)


def test_override_and_cpu(monkeypatch):
    monkeypatch.delenv(ENV_PEAK, raising=False)
    if not torch.cuda.is_available():
        assert peak_flops(torch.bfloat16) is None
    monkeypatch.setenv(ENV_PEAK, "1.5e12")
    assert peak_flops(torch.float32) == 1.5e12
    monkeypatch.setenv(ENV_PEAK, "fast")
    with pytest.raises(ValueError, match=ENV_PEAK):
        peak_flops(torch.float32)
