"""Tier 2 (gloo, real processes): every collective against torch.distributed, the logger's byte
counts exact, bad input rejected with a clear error."""

import pytest
import torch
import torch.distributed as dist

import ds_comm
from ds_comm import CommsLogger, OpKind, ReduceOp
from ds_comm.testing import distributed_test


def _data(rank: int, n: int = 6, dtype=torch.float32) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.float64) * (rank + 1) + rank).to(dtype)


def _check_collectives_against_torch(world_size: int) -> None:
    r, n = dist.get_rank(), dist.get_world_size()
    assert n == world_size
    lg = CommsLogger(enabled=True)

    # all_reduce SUM / MAX / AVG (AVG is emulated on gloo)
    for op in (ReduceOp.SUM, ReduceOp.MAX):
        ours, ref = _data(r), _data(r)
        ds_comm.all_reduce(ours, op=op, logger=lg)
        dist.all_reduce(ref, op=op)
        assert torch.equal(ours, ref)
    ours, ref = _data(r), _data(r)
    ds_comm.all_reduce(ours, op=ReduceOp.AVG, logger=lg)
    dist.all_reduce(ref)
    assert torch.allclose(ours, ref / n)
    # async handle
    ours = _data(r)
    h = ds_comm.all_reduce(ours, async_op=True, logger=lg)
    h.wait()
    ref = _data(r)
    dist.all_reduce(ref)
    assert torch.equal(ours, ref)

    # reduce / broadcast
    ours, ref = _data(r), _data(r)
    ds_comm.reduce(ours, dst=n - 1, logger=lg)
    dist.reduce(ref, dst=n - 1)
    if r == n - 1:
        assert torch.equal(ours, ref)
    ours = _data(r)
    ds_comm.broadcast(ours, src=1, logger=lg)
    assert torch.equal(ours, _data(1))

    # all_gather (list and tensor forms)
    outs = [torch.empty(6) for _ in range(n)]
    ds_comm.all_gather(outs, _data(r), logger=lg)
    assert all(torch.equal(outs[i], _data(i)) for i in range(n))
    out = torch.empty(n * 6)
    ds_comm.all_gather_into_tensor(out, _data(r), logger=lg)
    assert torch.equal(out, torch.cat([_data(i) for i in range(n)]))
    h = ds_comm.all_gather_single(out.zero_(), _data(r), async_op=True, logger=lg)
    h.wait()
    assert torch.equal(out, torch.cat([_data(i) for i in range(n)]))

    # reduce_scatter (list and tensor forms), also AVG
    full = [_data(r * 10 + i, 4) for i in range(n)]
    expected = [sum(_data(j * 10 + i, 4) for j in range(n)) for i in range(n)]
    o = torch.empty(4)
    ds_comm.reduce_scatter(o, full, logger=lg)
    assert torch.allclose(o, expected[r])
    o2 = torch.empty(4)
    ds_comm.reduce_scatter_tensor(o2, torch.cat(full), op=ReduceOp.AVG, logger=lg)
    assert torch.allclose(o2, expected[r] / n)

    # all_to_all_single (even and uneven splits) and the list form
    inp = torch.arange(n * 2, dtype=torch.float32) + 100 * r
    o = torch.empty(n * 2)
    ds_comm.all_to_all_single(o, inp, logger=lg)
    ref = torch.empty(n * 2)
    dist.all_to_all_single(ref, inp)
    assert torch.equal(o, ref)
    in_splits = [i + 1 for i in range(n)]  # rank r sends i+1 rows to rank i
    out_splits = [r + 1] * n
    inp = torch.full((sum(in_splits),), float(r))
    o = torch.empty(sum(out_splits))
    ds_comm.all_to_all_single(o, inp, out_splits, in_splits, logger=lg)
    assert torch.equal(o, torch.cat([torch.full((r + 1,), float(i)) for i in range(n)]))
    outs = [torch.empty(3) for _ in range(n)]
    ds_comm.all_to_all(outs, [torch.full((3,), float(r * n + i)) for i in range(n)], logger=lg)
    assert all(torch.equal(outs[i], torch.full((3,), float(i * n + r))) for i in range(n))

    # gather / scatter
    gl = [torch.empty(6) for _ in range(n)] if r == 0 else None
    ds_comm.gather(_data(r), gl, dst=0, logger=lg)
    if r == 0:
        assert all(torch.equal(gl[i], _data(i)) for i in range(n))
    t = torch.empty(6)
    ds_comm.scatter(t, [_data(i + 7) for i in range(n)] if r == 0 else None, src=0, logger=lg)
    assert torch.equal(t, _data(r + 7))

    # point to point, sync and async, in a ring
    nxt, prv = (r + 1) % n, (r - 1) % n
    got = torch.empty(6)
    if r % 2 == 0:
        ds_comm.send(_data(r), nxt, logger=lg)
        ds_comm.recv(got, prv, logger=lg)
    else:
        ds_comm.recv(got, prv, logger=lg)
        ds_comm.send(_data(r), nxt, logger=lg)
    assert torch.equal(got, _data(prv))
    got2 = torch.empty(6)
    hs = [ds_comm.isend(_data(r), nxt, logger=lg), ds_comm.irecv(got2, prv, logger=lg)]
    for h in hs:
        h.wait()
    assert torch.equal(got2, _data(prv))
    ds_comm.barrier(logger=lg)

    # Byte counts: exact, with nccl-tests' size convention.
    f = 4  # fp32 bytes
    rows = {(s.name, s.msg_bytes): s for s in lg.stats()}
    assert rows[("all_reduce", 6 * f)].count == 4  # SUM, MAX, AVG (as SUM), async
    assert rows[("all_reduce", 6 * f)].kind is OpKind.ALL_REDUCE
    assert rows[("reduce", 6 * f)].count == 1
    assert rows[("broadcast", 6 * f)].count == 1
    assert rows[("all_gather", n * 6 * f)].count == 1
    assert rows[("all_gather_into_tensor", n * 6 * f)].count == 1
    assert rows[("all_gather_single", n * 6 * f)].count == 1
    assert rows[("reduce_scatter", n * 4 * f)].count == 1
    assert rows[("reduce_scatter_tensor", n * 4 * f)].count == 1
    assert rows[("all_to_all_single", n * 2 * f)].count == 1
    assert rows[("all_to_all_single", sum(in_splits) * f)].count == 1
    assert rows[("all_to_all", n * 3 * f)].count == 1  # built on all_to_all_single on gloo
    assert rows[("gather", n * 6 * f)].count == 1
    assert rows[("scatter", n * 6 * f)].count == 1
    assert rows[("send", 6 * f)].count == 1 and rows[("recv", 6 * f)].count == 1
    assert rows[("isend", 6 * f)].count == 1 and rows[("irecv", 6 * f)].count == 1
    assert rows[("barrier", 0)].count == 1
    ar = rows[("all_reduce", 6 * f)]
    assert ar.total_bytes == 4 * 24
    assert ar.wire_bytes == 4 * round(24 * 2 * (n - 1) / n)
    assert ar.busbw == pytest.approx(ar.algbw * 2 * (n - 1) / n)
    ag = rows[("all_gather", n * 24)]
    assert ag.busbw == pytest.approx(ag.algbw * (n - 1) / n)
    assert rows[("broadcast", 24)].busbw == pytest.approx(rows[("broadcast", 24)].algbw)
    assert all(s.total_latency_s > 0 for s in lg.stats() if s.name != "barrier")
    table = lg.log_summary(print_fn=lambda s: None)
    assert "all_reduce" in table and "busbw" in table

    # Off: nothing recorded, results unchanged.
    lg.reset()
    lg.disable()
    t = _data(r)
    ds_comm.all_reduce(t, logger=lg)
    assert lg.stats() == []


def _check_bad_input() -> None:
    r, n = dist.get_rank(), dist.get_world_size()
    nc = torch.zeros(4, 4).t()
    with pytest.raises(ValueError, match=r"all_reduce: `tensor` is not contiguous"):
        ds_comm.all_reduce(nc)
    with pytest.raises(TypeError, match="torch.bool"):
        ds_comm.all_reduce(torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        ds_comm.broadcast([1, 2], src=0)
    with pytest.raises(TypeError, match="AVG needs a floating dtype"):
        ds_comm.all_reduce(torch.ones(3, dtype=torch.int64), op=ReduceOp.AVG)
    with pytest.raises(ValueError, match=rf"must hold world_size \({n}\)"):
        ds_comm.all_gather_into_tensor(torch.empty(n * 3 + 1), torch.empty(3))
    with pytest.raises(TypeError, match="torch.float64"):
        ds_comm.all_gather_into_tensor(torch.empty(n * 3), torch.empty(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="`tensor_list` has 1 entries"):
        ds_comm.all_gather([torch.empty(3)], torch.empty(3))
    with pytest.raises(ValueError, match=r"`tensor_list\[0\]` has 2 elements"):
        ds_comm.all_gather([torch.empty(2)] * n, torch.empty(3))
    with pytest.raises(ValueError, match="input_split_sizes sum to"):
        ds_comm.all_to_all_single(torch.empty(n), torch.empty(n), None, [5] * n)
    with pytest.raises(ValueError, match="outside the default group"):
        ds_comm.new_group([0, n])
    # Wrong dtypes in the list forms. On gloo all_to_all and reduce_scatter of lists run on
    # flat buffers, where a float64 entry would otherwise be cast silently (torch.cat promotes,
    # copy_ converts); the native list forms fail with an error naming neither call nor argument.
    f64 = torch.float64
    with pytest.raises(TypeError, match=r"all_gather: `tensor_list\[1\]` is torch.float64"):
        ds_comm.all_gather([torch.empty(3)] + [torch.empty(3, dtype=f64)] * (n - 1), torch.ones(3))
    with pytest.raises(TypeError, match=r"reduce_scatter: `input_list\[0\]` is torch.float64"):
        ds_comm.reduce_scatter(torch.empty(2), [torch.ones(2, dtype=f64)] * n)
    with pytest.raises(TypeError, match=r"all_to_all: `output_tensor_list\[0\]` is torch.float32"):
        ds_comm.all_to_all([torch.empty(2)] * n, [torch.ones(2, dtype=f64)] * n)
    with pytest.raises(TypeError, match=r"all_to_all: `input_tensor_list\[1\]` is torch.int64"):
        ds_comm.all_to_all(
            [torch.empty(2) for _ in range(n)],
            [torch.ones(2)] + [torch.ones(2, dtype=torch.int64)] * (n - 1),
        )
    if r == 0:  # only the root holds the list; the other ranks do not enter the collective
        with pytest.raises(TypeError, match=r"gather: `gather_list\[0\]` is torch.float64"):
            ds_comm.gather(torch.ones(3), [torch.empty(3, dtype=f64) for _ in range(n)], dst=0)
        with pytest.raises(TypeError, match=r"scatter: `scatter_list\[0\]` is torch.float64"):
            ds_comm.scatter(torch.empty(3), [torch.ones(3, dtype=f64)] * n, src=0)
    # The chunk a rank sends itself must be the chunk it expects from itself: the one size of
    # an all-to-all that is checkable without communicating (gloo would abort on it).
    with pytest.raises(ValueError, match=rf"rank {r} sends itself 2 elements .* expects 3"):
        ds_comm.all_to_all([torch.empty(3) for _ in range(n)], [torch.ones(2)] * n)
    ins, outs = [1] * n, [1] * n
    outs[r] = 2
    with pytest.raises(ValueError, match=rf"rank {r} sends itself 1 elements .* expects 2"):
        ds_comm.all_to_all_single(torch.empty(n + 1), torch.ones(n), outs, ins)
    with pytest.raises(ValueError, match=rf"rank {r} sends itself 2 elements .* expects 3"):
        ds_comm.all_to_all_single(torch.empty(n, 3), torch.ones(n, 2))  # rows of 2 vs 3
    # a group this rank is not in: every rank calls new_group, only rank 0 is a member
    g = ds_comm.new_group([0])
    if r != 0:
        with pytest.raises(ValueError, match=f"rank {r} is not a member"):
            ds_comm.all_reduce(torch.ones(2), group=g)
    else:
        t = torch.ones(2)
        ds_comm.all_reduce(t, group=g)
        assert torch.equal(t, torch.ones(2))
    ds_comm.barrier()


def _check_coalesced() -> None:
    r, n = dist.get_rank(), dist.get_world_size()
    lg = CommsLogger(enabled=True)
    shapes = [(3,), (2, 5), (7,), (1,), (4, 4)]
    tensors = [torch.randn(s, generator=torch.Generator().manual_seed(10 * r + i))
               for i, s in enumerate(shapes)]  # fmt: skip
    tensors.append(torch.arange(5, dtype=torch.int64) * (r + 1))  # a second dtype
    refs = [t.clone() for t in tensors]
    for t in refs:
        dist.all_reduce(t)
    # 64-byte buckets: several buckets, one tensor (16 fp32 = 64 B) alone in its bucket
    ds_comm.all_reduce_coalesced(tensors, bucket_size_bytes=64, logger=lg)
    for a, b in zip(tensors, refs):
        assert torch.allclose(a, b) and a.dtype == b.dtype
    plan = ds_comm.plan_buckets(tensors, 64)
    assert sum(len(b.indices) for b in plan) == len(tensors)
    assert len(plan) == sum(s.count for s in lg.get("all_reduce_coalesced"))
    assert lg.total_bytes("all_reduce_coalesced") == sum(t.numel() * t.element_size()
                                                         for t in tensors)  # fmt: skip
    # async form + AVG
    ts = [torch.full((3,), float(r)), torch.full((5,), 2.0 * r)]
    h = ds_comm.all_reduce_coalesced(ts, op=ReduceOp.AVG, async_op=True)
    h.wait()
    mean_r = sum(range(n)) / n
    assert torch.allclose(ts[0], torch.full((3,), mean_r))
    assert torch.allclose(ts[1], torch.full((5,), 2 * mean_r))

    # reduce_scatter_coalesced against a full all-reduce sliced per rank
    shapes = [(5,), (3, 3), (8,), (1,)]
    tensors = [torch.randn(s, generator=torch.Generator().manual_seed(7 * r + i))
               for i, s in enumerate(shapes)]  # fmt: skip
    shards = ds_comm.reduce_scatter_coalesced(tensors, bucket_size_bytes=40)
    for t, shard in zip(tensors, shards):
        full = t.clone().reshape(-1)
        dist.all_reduce(full)
        k = ds_comm.shard_numel(t.numel(), n)
        padded = torch.nn.functional.pad(full, (0, k * n - full.numel()))
        assert torch.allclose(shard, padded[r * k : (r + 1) * k], atol=1e-6)
    shards, h = ds_comm.reduce_scatter_coalesced(tensors, async_op=True)
    h.wait()
    assert len(shards) == len(tensors)


@distributed_test(world_size=[2, 4], timeout=180)
def test_collectives_match_torch_and_log_exact_bytes(world_size):
    _check_collectives_against_torch(world_size)
    _check_bad_input()
    _check_coalesced()


def _mismatch_across_ranks() -> None:
    r, n = dist.get_rank(), dist.get_world_size()
    # The collectives (AVG emulation included) work unchanged on torch's checking wrapper.
    t = torch.full((3,), float(r))
    ds_comm.all_reduce(t, op=ReduceOp.AVG)
    assert torch.allclose(t, torch.full((3,), sum(range(n)) / n))
    # Sizes that differ between ranks cannot be seen locally; with TORCH_DISTRIBUTED_DEBUG=DETAIL
    # every rank gets an error naming both shapes instead of gloo aborting one process (or, for
    # broadcast, silently leaving the tail of the larger buffers unwritten).
    with pytest.raises(RuntimeError, match="Detected mismatch between collectives"):
        ds_comm.all_reduce(torch.ones(4 + r))
    with pytest.raises(RuntimeError, match=r"TensorShape=\[4\]"):
        ds_comm.broadcast(torch.ones(4 + r), src=0)


@distributed_test(world_size=2, env={"TORCH_DISTRIBUTED_DEBUG": "DETAIL"}, timeout=120)
def test_sizes_mismatched_across_ranks_are_reported_under_debug_detail():
    _mismatch_across_ranks()
