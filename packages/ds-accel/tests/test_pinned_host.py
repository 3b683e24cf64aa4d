"""Exact-size page-locked host memory on CUDA (cudaHostRegister over the pages asked for;
torch's pinned allocator rounds each request up to a power of two), unregistered when the last
tensor over it is freed. The CUDA runtime is replaced by a recorder here."""

from __future__ import annotations

import gc

import pytest
import torch

from ds_accel._cuda import CUDAAccelerator
from ds_accel._pinned_host import registered_empty


class _Recorder:
    def __init__(self, rc: int = 0) -> None:
        self.rc = rc
        self.calls: list[tuple[str, int, int]] = []

    def cudaHostRegister(self, ptr, size, flags):  # noqa: N802 - the CUDA runtime's name
        self.calls.append(("register", ptr, size))
        return self.rc

    def cudaHostUnregister(self, ptr):  # noqa: N802
        self.calls.append(("unregister", ptr, 0))
        return 0


@pytest.fixture
def cudart(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: rec)
    return rec


def test_exact_pages_registered_and_unregistered_after_the_last_view(cudart):
    n = 798_777  # torch's pinned allocator would take 1 MiB for this
    raw = registered_empty(n)
    ((kind, ptr, size),) = cudart.calls
    assert kind == "register" and raw.data_ptr() == ptr and ptr % 4096 == 0
    assert raw.numel() == n and size == -(-n // 4096) * 4096 and size < 1 << 20
    view = raw[10:20]
    del raw
    gc.collect()
    assert len(cudart.calls) == 1  # a view still uses the memory
    view.fill_(3)
    del view
    gc.collect()
    assert cudart.calls[-1] == ("unregister", ptr, 0)


def test_pinned_empty_and_pin_memory_shapes_and_values(cudart):
    acc = CUDAAccelerator()
    t = acc.pinned_empty((3, 5), torch.bfloat16)
    assert t.shape == (3, 5) and t.dtype == torch.bfloat16
    assert cudart.calls[-1][2] == 4096  # 30 bytes: one page
    src = torch.randn(7, 11)
    pinned = acc.pin_memory(src)
    assert pinned.shape == src.shape and torch.equal(pinned, src)
    assert pinned.data_ptr() != src.data_ptr()


def test_failed_registration_falls_back_and_then_raises(cudart, monkeypatch):
    cudart.rc = 2  # cudaErrorMemoryAllocation
    real_empty = torch.empty

    def no_pinned_pool(*a, **k):
        if k.get("pin_memory"):
            raise RuntimeError("CUDA error: out of memory")
        return real_empty(*a, **k)

    monkeypatch.setattr(torch, "empty", no_pinned_pool)
    with pytest.raises(RuntimeError, match=r"cudaHostRegister of 1000 bytes failed \(error 2\)"):
        registered_empty(1000)
    gc.collect()
    assert [c[0] for c in cudart.calls] == ["register"]  # nothing left to unregister
