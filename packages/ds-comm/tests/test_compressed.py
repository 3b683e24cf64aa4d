"""Tier 2: 1-bit compressed all-reduce (bytes, error-feedback bound, identical results)."""

import pytest
import torch
import torch.distributed as dist

import ds_comm
from ds_comm import CommsLogger, ErrorFeedback, compressed_allreduce
from ds_comm._compressed import SCALES_LOG_NAME, SIGNS_LOG_NAME
from ds_comm.testing import distributed_test

NUMEL = 1001  # not a multiple of 8 * world_size: exercises padding


def _gather_server_errors(ef: ErrorFeedback) -> torch.Tensor:
    """The server errors of all ranks, laid out as the full (padded) tensor."""
    out = [torch.empty_like(ef.server_error) for _ in range(dist.get_world_size())]
    dist.all_gather(out, ef.server_error)
    return torch.cat(out)


def _check_bytes(n: int) -> None:
    lg = CommsLogger(enabled=True)
    x = torch.randn(NUMEL)
    compressed_allreduce(x, ErrorFeedback(), logger=lg)
    ref = torch.randn(NUMEL)
    ds_comm.all_reduce(ref, logger=lg)
    sign_wire = lg.wire_bytes(SIGNS_LOG_NAME)
    fp32_wire = lg.wire_bytes("all_reduce")
    expected = ds_comm.compressed_wire_bytes(NUMEL, n)
    assert sign_wire == expected["signs"]
    assert lg.wire_bytes(SCALES_LOG_NAME) == expected["scales"]
    assert fp32_wire == expected["fp32_allreduce"]
    # padded numel / 8 bytes through the all-to-all and the all-gather each
    padded = -(-NUMEL // (8 * n)) * 8 * n
    assert lg.total_bytes(SIGNS_LOG_NAME) == 2 * padded // 8
    assert fp32_wire >= 16 * sign_wire, (fp32_wire, sign_wire)


def _check_error_feedback(n: int) -> None:
    r = dist.get_rank()
    x = torch.randn(NUMEL, generator=torch.Generator().manual_seed(r)) * (1 + r)
    x[:50] *= 20  # uneven magnitudes make a single compressed step badly biased
    true = x.clone()
    dist.all_reduce(true)
    true /= n
    ef = ErrorFeedback()
    acc = torch.zeros(NUMEL, dtype=torch.float64)
    errs = {}
    for k in range(1, 201):
        y = x.clone()
        compressed_allreduce(y, ef)
        acc += y
        if k in (25, 200):
            running = (acc / k).float()
            err = (running - true).abs().max().item()
            # The telescoping identity: sum_k out_k = K * true - mean_i e_i - s, exactly
            # (up to float rounding); hence the bound (max_i |e_i| + |s|) / K.
            we = ef.worker_error.clone()
            dist.all_reduce(we)
            we /= n
            se = _gather_server_errors(ef)
            predicted = true - (we + se)[:NUMEL] / k
            assert torch.allclose(running, predicted, atol=1e-3 * (1 + true.abs().max())), k
            wmax = ef.worker_error.abs().max().clone()
            dist.all_reduce(wmax, op=dist.ReduceOp.MAX)
            smax = torch.tensor(ef.server_error.abs().max().item())
            dist.all_reduce(smax, op=dist.ReduceOp.MAX)
            bound = (wmax + smax).item() / k
            assert err <= bound * 1.001 + 1e-5, (k, err, bound)
            errs[k] = err
    # Without error feedback (a fresh state every call) every output is the same biased
    # estimate, so its running mean never improves: error feedback must beat it by far.
    y = x.clone()
    compressed_allreduce(y, ErrorFeedback())
    no_feedback = (y - true).abs().max().item()
    assert errs[200] < errs[25] / 4, errs  # decays (the bound predicts 1/K)
    assert errs[200] < no_feedback / 10, (errs, no_feedback)


def _check_identical_and_shapes(n: int) -> None:
    r = dist.get_rank()
    for shape, dtype in (((3, 5), torch.float32), ((70,), torch.float64), ((2,), torch.float32)):
        t = torch.randn(shape, dtype=dtype) + r
        ef = ErrorFeedback()
        for _ in range(3):
            compressed_allreduce(t, ef)
        assert t.shape == shape and t.dtype == dtype
        gathered = [torch.empty_like(t) for _ in range(n)]
        dist.all_gather(gathered, t)
        assert all(torch.equal(g, t) for g in gathered)  # bitwise identical on every rank
    # bad input
    with pytest.raises(TypeError, match="floating"):
        compressed_allreduce(torch.ones(8, dtype=torch.int32), ErrorFeedback())
    with pytest.raises(TypeError, match="ErrorFeedback"):
        compressed_allreduce(torch.ones(8), None)
    with pytest.raises(ValueError, match="not contiguous"):
        compressed_allreduce(torch.ones(4, 4).t(), ErrorFeedback())
    ef = ErrorFeedback()
    compressed_allreduce(torch.ones(16), ef)
    with pytest.raises(ValueError, match="belongs to a tensor of 16 elements"):
        compressed_allreduce(torch.ones(17), ef)
    with pytest.raises(ValueError, match=r"different sizes \["):
        compressed_allreduce(torch.ones(10 + r), ErrorFeedback())


@distributed_test(world_size=[2, 4], timeout=180)
def test_compressed_allreduce(world_size):
    torch.manual_seed(1234 + dist.get_rank())
    _check_bytes(world_size)
    _check_error_feedback(world_size)
    _check_identical_and_shapes(world_size)
