"""Tier 3 (GPU machine): the same code on CUDA tensors and NCCL."""

import pytest
import torch

import ds_comm
from ds_comm.testing import run_distributed

pytestmark = pytest.mark.gpu


def test_bitpack_cuda_matches_cpu():
    x = torch.randn(4096)
    assert torch.equal(ds_comm.pack_signs(x.cuda()).cpu(), ds_comm.pack_signs(x))
    p = ds_comm.pack_signs(x)
    assert torch.equal(ds_comm.unpack_signs(p.cuda()).cpu(), ds_comm.unpack_signs(p))


def _nccl_body():
    import torch.distributed as dist

    layout = ds_comm.init_distributed()  # nccl from ds_accel, device = local rank
    assert dist.get_backend() == "nccl"
    r, n = layout.rank, layout.world_size
    dev = torch.device("cuda", torch.cuda.current_device())
    lg = ds_comm.CommsLogger(enabled=True)
    t = torch.full((1000,), float(r + 1), device=dev)
    ds_comm.all_reduce(t, logger=lg)
    assert torch.equal(t, torch.full_like(t, float(n * (n + 1) // 2)))
    assert lg.stats()[0].total_latency_s > 0
    # compressed on device: identical everywhere, logged bytes as predicted, EF converges
    x = torch.randn(10_001, device=dev, generator=torch.Generator(dev).manual_seed(r))
    true = x.clone()
    dist.all_reduce(true)
    true /= n
    ef = ds_comm.ErrorFeedback()
    acc = torch.zeros_like(x)
    for _ in range(100):
        y = x.clone()
        ds_comm.compressed_allreduce(y, ef, logger=lg)
        acc += y
    out = [torch.empty_like(y) for _ in range(n)]
    dist.all_gather(out, y)
    assert all(torch.equal(o, y) for o in out)
    assert (acc / 100 - true).abs().max() < (y - true).abs().max()
    assert (
        lg.wire_bytes("compressed_allreduce.signs")
        == 100 * ds_comm.compressed_wire_bytes(10_001, n)["signs"]
    )
    ds_comm.destroy_process_group()


@pytest.mark.gpu(n=2)
def test_nccl_collectives_and_compressed_allreduce_two_gpus():
    run_distributed(_nccl_body, 2, backend=None, timeout=300)
