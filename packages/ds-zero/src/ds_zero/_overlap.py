"""The next forward overlapping a stepper that is still updating (an offload stepper's CPU
update on a worker thread, see ``PartitionStepper``'s ``overlaps_step``).

``step()`` returns once the stepper has queued its work; from then on a partition's parameters
are read only after the stepper says its new values are in place:

* stage-3 sharded buckets wait in ``Bucket.gather`` (``before_read``), so every gather (forward,
  prefetch, backward, ``GatheredParameters``) sees updated shards; a prefetch whose shard is not
  updated yet is skipped rather than waited for (``read_ready``), so the unit running now is not
  held up by the next one;
* replicated buckets (stages 0-2, stage-3 persistent parameters) are read straight from the flat
  buffer, so a forward pre-hook on each unit (a transformer block, the root) waits for the
  partitions that unit reads and then refreshes them (the all-gather of stages 1-2).

The first forward also records the order units run in; the stepper updates partitions in that
order, so the next forward's first unit waits for one partition, not all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ds_zero._bucket import Bucket, slot_of


def _in_backward() -> bool:
    # activation-checkpoint recomputation runs forward hooks inside backward
    return torch._C._current_graph_task_id() != -1


class StepOverlap:
    """Per-partition waits and the recorded update order for an overlapping stepper."""

    def __init__(
        self,
        root: nn.Module,
        stepper: Any,
        trainable: Sequence[Bucket],
        units: Sequence[nn.Module],
        touched: dict[int, list[nn.Parameter]],
    ) -> None:
        self.stepper = stepper
        self.trainable = list(trainable)
        partition_of = {id(b): k for k, b in enumerate(self.trainable)}
        self._partition_of = partition_of
        for k, b in enumerate(self.trainable):
            if b.shard_params:
                b.before_read = lambda k=k: stepper.wait_partition(k)
                b.read_ready = lambda k=k: stepper.partition_ready(k)
        # per unit: the partitions its code reads, all of them (update order) and the
        # replicated ones (waited for by the unit's pre-hook)
        self._reads: dict[int, list[int]] = {}
        self._replicated: dict[int, list[int]] = {}
        for unit in units:
            reads: dict[int, None] = {}
            for p in touched.get(id(unit), []):
                slot = slot_of(p)
                if slot is not None and id(slot.bucket) in partition_of:
                    reads.setdefault(partition_of[id(slot.bucket)])
            self._reads[id(unit)] = list(reads)
            self._replicated[id(unit)] = [k for k in reads if not self.trainable[k].shard_params]
        # replicated partitions whose values of the last step are not known to be in place
        self._stale: set[int] = set()
        self._order: list[nn.Module] = []
        self._recorded = False
        self._handles: list[RemovableHandle] = []
        for unit in units:
            self._handles.append(
                unit.register_forward_pre_hook(self._make_pre_forward(unit), prepend=True)
            )
        self._handles.append(root.register_forward_hook(self._record_order))

    def _make_pre_forward(self, unit: nn.Module):
        def pre_forward(module: nn.Module, args: object) -> None:
            del module, args
            if not self._recorded and not _in_backward() and unit not in self._order:
                self._order.append(unit)
            if self._stale:
                for k in self._replicated[id(unit)]:
                    if k in self._stale:
                        self._refresh(k)

        return pre_forward

    def _record_order(self, module: nn.Module, args: object, output: object) -> None:
        del module, args, output
        if self._recorded or _in_backward():
            return
        self._recorded = True
        order: dict[int, None] = {}
        for unit in self._order:
            for k in self._reads[id(unit)]:
                order.setdefault(k)
        prefer = getattr(self.stepper, "prefer_order", None)
        if prefer is not None:
            prefer(list(order))

    def _refresh(self, k: int) -> None:
        """Partition ``k``'s new values are in its flat buffer slice (wait for the stepper),
        then in every rank's flat buffer (the all-gather of stages 1-2)."""
        self.stepper.wait_partition(k)
        work = self.trainable[k].refresh_replicated()
        if work is not None:
            work.wait()  # type: ignore[attr-defined]
        self._stale.discard(k)

    def after_step(self) -> None:
        """The stepper has queued an update: every replicated partition is stale until read."""
        self._stale = {k for k, b in enumerate(self.trainable) if not b.shard_params}

    def synchronize(self) -> None:
        """Every partition updated and refreshed (before state is read or written outside a
        forward: checkpoints, full state dicts, close)."""
        self.stepper.synchronize()
        for k in sorted(self._stale):
            self._refresh(k)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for b in self.trainable:
            b.before_read = None
            b.read_ready = None
