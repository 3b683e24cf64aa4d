"""Tier 1: the comms logger's arithmetic, bucket planning and wire-byte formulas (no processes)."""

import pytest
import torch

import ds_comm
from ds_comm import CommsLogger, OpKind, busbw_factor, compressed_wire_bytes, plan_buckets


@pytest.mark.parametrize(
    "kind,n,factor",
    [
        (OpKind.ALL_REDUCE, 4, 1.5),
        (OpKind.ALL_REDUCE, 2, 1.0),
        (OpKind.ALL_GATHER, 4, 0.75),
        (OpKind.REDUCE_SCATTER, 8, 0.875),
        (OpKind.ALL_TO_ALL, 2, 0.5),
        (OpKind.BROADCAST, 4, 1.0),
        (OpKind.REDUCE, 4, 1.0),
        (OpKind.SEND, 2, 1.0),
        (OpKind.BARRIER, 4, 0.0),
    ],
)
def test_busbw_factors_are_nccl_tests(kind, n, factor):
    assert busbw_factor(kind, n) == pytest.approx(factor)


def test_record_aggregates_and_summarises():
    lines = []
    lg = CommsLogger(enabled=True, verbose=True, print_fn=lines.append)
    lg.record("all_reduce", OpKind.ALL_REDUCE, 1000, 0.001, 4)
    lg.record("all_reduce", OpKind.ALL_REDUCE, 1000, 0.003, 4)
    lg.record("all_reduce", OpKind.ALL_REDUCE, 8, 0.5, 4)
    lg.record("broadcast", OpKind.BROADCAST, 100, 0.001, 4)
    assert len(lines) == 4 and "busbw=" in lines[0]
    (big,) = [s for s in lg.get("all_reduce") if s.msg_bytes == 1000]
    assert big.count == 2 and big.total_bytes == 2000
    assert big.avg_latency_s == pytest.approx(0.002)
    assert big.algbw == pytest.approx(2000 / 0.004)
    assert big.busbw == pytest.approx(2000 / 0.004 * 1.5)
    assert big.wire_bytes == 2 * 1500
    assert lg.total_bytes() == 2000 + 8 + 100 and lg.total_bytes("broadcast") == 100
    table = lg.log_summary(print_fn=lines.append)
    assert lines[-1] == table
    header, rule, *rows = table.splitlines()
    assert "busbw (GB/s)" in header and len(rows) == 3
    assert rows[0].split()[0] == "all_reduce" and rows[0].split()[1:3] == ["8", "B"]
    lg.reset()
    assert lg.stats() == []


def test_prof_ops_filters():
    lg = CommsLogger(enabled=True, prof_ops=["broadcast"])
    lg.record("all_reduce", OpKind.ALL_REDUCE, 8, 0.1, 2)
    lg.record("broadcast", OpKind.BROADCAST, 8, 0.1, 2)
    assert [s.name for s in lg.stats()] == ["broadcast"]


def test_default_logger_is_replaceable():
    mine = CommsLogger(enabled=True)
    previous = ds_comm.set_comms_logger(mine)
    try:
        assert ds_comm.get_comms_logger() is mine
        mine.record("x", OpKind.SEND, 4, 0.1, 2)
        assert "x" in ds_comm.log_summary()
    finally:
        ds_comm.set_comms_logger(previous)
    assert ds_comm.get_comms_logger() is previous
    with pytest.raises(TypeError, match="CommsLogger"):
        ds_comm.set_comms_logger("not a logger")


def test_plan_buckets_groups_by_dtype_and_size():
    ts = [torch.zeros(4), torch.zeros(4, dtype=torch.float64), torch.zeros(4), torch.zeros(20),
          torch.zeros(1)]  # fmt: skip
    plan = plan_buckets(ts, 32)  # 32 bytes: two 4-float tensors fit, the 20-float one alone
    assert [b.indices for b in plan] == [(0, 2), (1,), (3,), (4,)]
    assert plan[1].dtype is torch.float64
    with pytest.raises(ValueError, match="bucket_size_bytes"):
        plan_buckets(ts, 0)
    assert ds_comm.shard_numel(10, 4) == 3 and ds_comm.shard_numel(8, 4) == 2


def test_compressed_wire_bytes_formula():
    w = compressed_wire_bytes(1001, 2)  # padded to 1008
    assert w["signs"] == 2 * (1008 // 8) // 2 == 126
    assert w["scales"] == 8
    assert w["fp32_allreduce"] == 4004
    big = compressed_wire_bytes(64 * 2**20, 2)
    assert big["fp32_allreduce"] / big["signs"] == 32
