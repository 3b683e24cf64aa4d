"""aligned_empty(pin=True) with a device takes the accelerator's exact-size pinned memory (not
torch's power-of-two rounded allocator), and falls back to pageable memory with one warning when
the memory cannot be locked. The accelerator is replaced by a recorder here; test_gpu.py and
ds-accel's tests cover the real CUDA path."""

from __future__ import annotations

import pytest
import torch

from ds_offload import OffloadWarning, _pinned


class _Accel:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.asked: list[tuple[tuple[int, ...], torch.dtype]] = []

    def device_name(self) -> str:
        return "cuda"

    def is_available(self) -> bool:
        return True

    def pinned_empty(self, shape, dtype):
        self.asked.append((shape, dtype))
        if self.fail:
            raise RuntimeError("cudaHostRegister of 4096 bytes failed (error 2)")
        return torch.empty(shape, dtype=dtype)

    def is_pinned(self, tensor) -> bool:
        return True


@pytest.fixture
def accel(monkeypatch):
    import ds_accel

    acc = _Accel()
    monkeypatch.setattr(ds_accel, "get_accelerator", lambda: acc)
    return acc


def test_aligned_pinned_buffers_come_from_the_accelerator(accel):
    buf = _pinned.aligned_empty(1000, torch.float32, pin=True)
    # 4000 bytes padded to a page, plus a page of slack to align the start
    assert accel.asked == [((8192,), torch.uint8)]
    assert buf.numel() == 1000 and buf.data_ptr() % 4096 == 0
    assert _pinned.aligned_empty(10, torch.float32, pin=False) is not None
    assert len(accel.asked) == 1  # pageable buffers do not ask


def test_unlockable_memory_warns_and_gives_pageable_memory(accel):
    accel.fail = True
    with pytest.warns(OffloadWarning, match=r"pinned allocation failed: cudaHostRegister"):
        buf = _pinned.aligned_empty(1000, torch.float32, pin=True)
    buf.fill_(1.0)
    assert buf.sum().item() == 1000.0
