"""Tier 1: the range arithmetic behind dedupe on save and range reads on load."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ds_ckpt._plan import HeldRange, RangeIndex, Stored, plan_writes


def _held(rank, index, off, n, name="w", shape=(10,)):
    return HeldRange(rank, index, name, shape, "F32", off, n)


def test_replicated_copies_are_written_once():
    plan = plan_writes([_held(r, 0, 0, 10) for r in (2, 0, 1)])
    assert list(plan) == [0]
    assert [(p.offset, p.numel) for p in plan[0]] == [(0, 10)]


def test_replicated_tensors_are_spread_over_ranks():
    held = [_held(r, i, 0, 10, name=f"t{i}") for r in range(2) for i in range(4)]
    plan = plan_writes(held)
    assert sorted(len(v) for v in plan.values()) == [2, 2]


def test_balancing_counts_single_holder_ranges_first():
    # rank 0 alone holds 8 elements of w; the replicated v goes to rank 1
    held = [
        _held(0, 0, 0, 8),
        _held(1, 0, 8, 2),
        _held(0, 1, 0, 4, name="v", shape=(4,)),
        _held(1, 1, 0, 4, name="v", shape=(4,)),
    ]
    plan = plan_writes(held)
    assert [(p.name, p.offset, p.numel) for p in plan[1]] == [("w", 8, 2), ("v", 0, 4)]
    assert [(p.name, p.offset, p.numel) for p in plan[0]] == [("w", 0, 8)]


def test_partial_overlaps_split_between_ranks():
    plan = plan_writes([_held(1, 0, 0, 6), _held(0, 0, 4, 6)])
    got = {r: [(p.offset, p.numel) for p in v] for r, v in plan.items()}
    assert (
        got == {1: [(0, 4)], 0: [(6, 4)], **got}
        and sum(n for v in got.values() for _, n in v) == 10
    )


def test_gap_is_an_error_naming_tensor_and_range():
    with pytest.raises(ValueError, match=r"'w': elements \[4, 6\) of 10"):
        plan_writes([_held(0, 0, 0, 4), _held(1, 0, 6, 4)])


def test_shape_disagreement_is_an_error():
    with pytest.raises(ValueError, match="rank 1 holds shape"):
        plan_writes([_held(0, 0, 0, 10), _held(1, 0, 0, 12, shape=(12,))])


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 60),
    st.lists(
        st.tuples(st.integers(0, 5), st.integers(0, 60), st.integers(0, 60)),
        min_size=1,
        max_size=12,
    ),
)
def test_every_element_written_exactly_once(total, raw):
    held = [
        _held(r, i, min(a, total), min(n, total - min(a, total)), shape=(total,))
        for i, (r, a, n) in enumerate(raw)
    ]
    held.append(_held(9, 99, 0, total, shape=(total,)))  # guarantees coverage
    plan = plan_writes(held)
    count = [0] * total
    for pieces in plan.values():
        for p in pieces:
            h = next(h for h in held if h.rank == p.rank and h.index == p.index)
            assert h.offset <= p.offset and p.offset + p.numel <= h.offset + h.numel
            for e in range(p.offset, p.offset + p.numel):
                count[e] += 1
                # the owner holds the element, through its lowest-index copy on that rank
                best = min(
                    x.index for x in held if x.rank == p.rank and x.offset <= e < x.offset + x.numel
                )
                assert p.index == best
    assert count == [1] * total


def test_range_index_reads_span_pieces():
    idx = RangeIndex("w", 10, [Stored("a", 0, 4, 100), Stored("b", 4, 6, 200)])
    reads = idx.reads(2, 5, itemsize=4)
    assert [(r.file, r.byte_start, r.numel, r.dst) for r in reads] == [
        ("a", 108, 2, 0),
        ("b", 200, 3, 2),
    ]


def test_range_index_rejects_overlap_and_gap():
    with pytest.raises(ValueError, match="overlap"):
        RangeIndex("w", 10, [Stored("a", 0, 6, 0), Stored("b", 4, 6, 0)])
    with pytest.raises(ValueError, match="gap"):
        RangeIndex("w", 10, [Stored("a", 0, 3, 0), Stored("b", 4, 6, 0)])
    with pytest.raises(ValueError, match="cover 6 of 10"):
        RangeIndex("w", 10, [Stored("a", 0, 6, 0)])
