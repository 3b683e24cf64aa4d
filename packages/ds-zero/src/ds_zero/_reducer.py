"""Backward-overlapped gradient reduction: buckets are reduced as their grads become ready.

Readiness comes from post-accumulate-grad hooks (one call per parameter per backward, after
every use of a tied or re-used parameter has been summed). Buckets are issued strictly in one
fixed order on every rank, so all ranks issue the same collectives in the same sequence even
when a rank leaves a parameter unused; a bucket that is ready early waits for its predecessors.
At most ``max_inflight`` reductions are in flight, which bounds the memory of flat gradient
buffers waiting on the network.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Sequence

import torch

from ds_zero._bucket import Bucket, PendingReduce, slot_of


class ReducerState(enum.Enum):
    """Where the reducer is within one backward pass."""

    IDLE = "idle"
    """Between backward passes: no bucket partially counted, nothing in flight."""
    RUNNING = "running"
    """Inside a backward: counting ready params, buckets issued in order, reductions in flight."""


class GradReducer:
    def __init__(
        self,
        buckets: Sequence[Bucket],
        reduce_dtype: torch.dtype,
        *,
        local_accumulation: bool,
        max_inflight: int,
        on_issued: Callable[[Bucket], None],
        on_final: Callable[[Bucket], None] | None = None,
    ) -> None:
        self.order: list[Bucket] = [b for b in buckets if b.trainable]
        self.reduce_dtype = reduce_dtype
        self.local_accumulation = local_accumulation
        self.max_inflight = max_inflight
        self.on_issued = on_issued
        # called once a bucket's gradient of the accumulation boundary is reduced (final)
        self.on_final = on_final
        self.state = ReducerState.IDLE
        self.sync = True
        self._remaining: dict[int, int] = {}
        self._next = 0
        self._inflight: deque[PendingReduce] = deque()

    def set_order(self, buckets: Sequence[Bucket]) -> None:
        if self.state is not ReducerState.IDLE:
            raise RuntimeError("the reduction order can only change between backward passes")
        self.order = [b for b in buckets if b.trainable]

    def start(self, sync: bool) -> None:
        """First hook of a backward: ``sync`` False means a non-boundary micro-step."""
        self.state = ReducerState.RUNNING
        self.sync = sync
        self._next = 0
        self._remaining = {b.index: sum(1 for p in b.params if p.requires_grad) for b in self.order}

    def param_ready(self, param: torch.Tensor) -> None:
        slot = slot_of(param)
        if slot is None or slot.bucket.index not in self._remaining:
            return
        left = self._remaining[slot.bucket.index] - 1
        self._remaining[slot.bucket.index] = left
        if left == 0:
            self._advance()

    def _advance(self) -> None:
        while self._next < len(self.order):
            bucket = self.order[self._next]
            if self._remaining[bucket.index] > 0:
                return
            self._issue(bucket)
            self._next += 1

    def _issue(self, bucket: Bucket) -> None:
        if not self.sync and self.local_accumulation:
            bucket.accumulate_locally(self.reduce_dtype)
        else:
            self._inflight.append(bucket.issue_reduce(self.reduce_dtype))
            while len(self._inflight) > self.max_inflight:  # 0: synchronous (no overlap)
                self._finish_one()
        self.on_issued(bucket)

    def _finish_one(self) -> None:
        pending = self._inflight.popleft()
        pending.bucket.finish_reduce(pending, final=self.sync)
        if self.sync and self.on_final is not None:
            self.on_final(pending.bucket)

    def finish(self) -> None:
        """End of backward: reduce what unused parameters held back, then drain."""
        if self.state is ReducerState.IDLE:
            return
        for bucket in self.order:
            self._remaining[bucket.index] = 0
        self._advance()
        while self._inflight:
            self._finish_one()
        self.state = ReducerState.IDLE
