"""Flat-buffer partitioning math: where each parameter lives in a bucket and in each rank's shard.

A bucket concatenates parameters into one flat buffer. Every parameter starts at a multiple of
``align`` elements (aligned starts keep matmul operands on vector boundaries), and the total is
padded to a multiple of ``world_size * align`` so that every rank owns one equal, aligned,
contiguous shard ``[rank * shard, (rank + 1) * shard)``. Equal shards are what
``all_gather_single`` / ``reduce_scatter_single`` need, so a bucket needs one collective.
Pure functions, no process group: tested in one process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class FlatLayout:
    """Offsets of parameters in one flat buffer, split into ``world_size`` equal shards."""

    numels: tuple[int, ...]
    offsets: tuple[int, ...]
    world_size: int
    padded_numel: int

    @property
    def shard_numel(self) -> int:
        return self.padded_numel // self.world_size

    def shard_range(self, rank: int) -> tuple[int, int]:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside world_size {self.world_size}")
        return rank * self.shard_numel, (rank + 1) * self.shard_numel

    def intersect(self, index: int, start: int, end: int) -> tuple[int, int, int] | None:
        """Overlap of parameter ``index`` with flat range ``[start, end)``.

        Returns ``(offset_in_param, offset_in_range, numel)`` or None when they do not overlap.
        """
        p_start = self.offsets[index]
        p_end = p_start + self.numels[index]
        lo, hi = max(p_start, start), min(p_end, end)
        if lo >= hi:
            return None
        return lo - p_start, lo - start, hi - lo

    def owner_of_first_element(self, index: int) -> int:
        """The rank whose shard holds the parameter's element 0 (writes per-param scalars)."""
        return self.offsets[index] // self.shard_numel if self.shard_numel else 0


def make_layout(numels: Sequence[int], world_size: int, align: int = 1) -> FlatLayout:
    """Lay out parameters of ``numels`` elements for ``world_size`` ranks."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    offsets, cursor = [], 0
    for n in numels:
        if n < 0:
            raise ValueError(f"parameter sizes must be >= 0, got {n}")
        offsets.append(cursor)
        cursor = _round_up(cursor + n, align)
    padded = _round_up(max(cursor, 1), world_size * align)
    return FlatLayout(tuple(numels), tuple(offsets), world_size, padded)


def split_into_buckets(numels: Sequence[int], bucket_numel: int) -> list[list[int]]:
    """Greedy split of parameter indices (in the given order) into buckets of about
    ``bucket_numel`` elements; a parameter larger than a bucket gets a bucket of its own."""
    if bucket_numel < 1:
        raise ValueError(f"bucket size must be >= 1 element, got {bucket_numel}")
    buckets: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, n in enumerate(numels):
        if current and size + n > bucket_numel:
            buckets.append(current)
            current, size = [], 0
        current.append(i)
        size += n
    if current:
        buckets.append(current)
    return buckets
