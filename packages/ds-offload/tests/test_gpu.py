"""Accelerator tier: the offload stepper with CUDA partitions (side-stream copies, bf16 shards)
and pinned CUDA host memory for AsyncIO. Skipped without a GPU."""

import pytest
import torch
from _zero_like import Part

from ds_offload import AsyncIO, OffloadStepper, aligned_empty

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _train(device, lp, steps=4, nparts=3, n=100_003):
    torch.manual_seed(0)
    # drawn on the host: CUDA's generator gives other numbers for the same seed
    masters = [torch.randn(n).to(device) for _ in range(nparts)]
    shards = [m.to(lp) for m in masters] if lp is not None else [None] * nparts
    parts = [Part(i, 0, masters[i], shards[i]) for i in range(nparts)]
    s = OffloadStepper({"device": "cpu", "pin_memory": True})
    s.setup(parts, [{"lr": 1e-2, "weight_decay": 0.1}])
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        grads = [torch.randn(n, generator=g).to(device) for _ in range(nparts)]
        s.step(grads)
    return [s.state_tensors(i)["master"].clone() for i in range(nparts)], shards, masters


def test_cuda_partitions_match_cpu_partitions():
    cpu, _, _ = _train("cpu", None)
    gpu, shards, _ = _train("cuda", torch.bfloat16)
    for a, b, sh in zip(cpu, gpu, shards):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        assert torch.equal(sh.cpu(), b.to(torch.bfloat16))


def test_fp32_cuda_master_written_back():
    cpu, _, _ = _train("cpu", None)
    _, _, masters = _train("cuda", None)
    for a, m in zip(cpu, masters):
        torch.testing.assert_close(m.cpu(), a, atol=1e-6, rtol=0)


def test_aio_with_cuda_pinned_buffers(tmp_path):
    buf = aligned_empty(1 << 20, torch.float32, pin=True)
    assert buf.is_pinned() and buf.data_ptr() % 4096 == 0
    src = torch.randn(1 << 20, device="cuda")
    buf.copy_(src)
    with AsyncIO() as aio:
        aio.pwrite(buf, tmp_path / "x.bin")
        out = aligned_empty(1 << 20, torch.float32, pin=True)
        aio.pread(out, tmp_path / "x.bin")
    assert torch.equal(out.cuda(), src)


def test_pinned_buffers_are_registered_pages_not_powers_of_two():
    """aligned_empty(pin=True) on CUDA: page-locked (is_pinned, asynchronous copies) over the
    pages asked for; torch's pinned allocator would have rounded 3 MiB + 5 bytes up to 4 MiB."""
    from ds_accel._pinned_host import registered_empty

    raw = registered_empty(3 * 2**20 + 5)
    assert raw.is_pinned() and raw.numel() == 3 * 2**20 + 5
    buf = aligned_empty(3 * 2**20 // 4 + 1, torch.float32, pin=True)
    assert buf.is_pinned()
    buf.copy_(torch.arange(buf.numel(), dtype=torch.float32))
    dev = torch.empty(buf.numel(), device="cuda")
    dev.copy_(buf, non_blocking=True)
    back = torch.empty_like(buf)
    back.copy_(dev, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(back, buf)
