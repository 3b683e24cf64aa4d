"""Stage 3: gather a unit's parameters right before it runs, release them right after.

Units are modules (transformer blocks and the root by default). A forward pre-hook gathers the
unit's buckets and prefetches the next unit in the recorded forward order; a forward hook
releases them and hooks the outputs so that the first gradient reaching them (the start of the
unit's backward) gathers the unit again and prefetches the unit that runs next in backward.
Release in backward happens when the unit's gradients are reduced (see ``GradReducer``), since a
parameter's gradient being final means every backward node that read it has run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ds_zero._bucket import Bucket, ParamsState
from ds_zero._options import ZeroOptions


def _in_backward() -> bool:
    # activation-checkpoint recomputation runs forward hooks inside backward: keep params
    return torch._C._current_graph_task_id() != -1


def _grad_tensors(output: object) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []

    def visit(x: object) -> None:
        if isinstance(x, torch.Tensor):
            if x.requires_grad:
                found.append(x)
        elif isinstance(x, (list, tuple)):
            for y in x:
                visit(y)
        elif isinstance(x, dict):
            for y in x.values():
                visit(y)

    visit(output)
    return found


class Stage3Scheduler:
    """Drives gather / prefetch / release of stage-3 units through module hooks."""

    def __init__(
        self,
        root: nn.Module,
        units: Sequence[nn.Module],
        unit_buckets: dict[nn.Module, list[Bucket]],
        options: ZeroOptions,
        on_backward_start: Callable[[], None],
    ) -> None:
        self.root = root
        self.units = list(units)
        self.unit_buckets = unit_buckets
        self.options = options
        self.on_backward_start = on_backward_start
        self.all_buckets: list[Bucket] = list(
            {id(b): b for bs in unit_buckets.values() for b in bs}.values()
        )
        self.forward_order: list[nn.Module] = []
        self.order_recorded = False
        self.order_listeners: list[Callable[[list[nn.Module]], None]] = []
        self._active: list[nn.Module] = []
        self._backward_gathered: set[int] = set()
        self._handles: list[RemovableHandle] = []
        for unit in self.units:
            self._handles.append(unit.register_forward_pre_hook(self._make_pre_forward(unit)))
            self._handles.append(unit.register_forward_hook(self._make_post_forward(unit)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ---- memory bookkeeping ----------------------------------------------------------------
    def live_numel(self) -> int:
        return sum(
            b.layout.padded_numel for b in self.all_buckets if b.state is not ParamsState.SHARDED
        )

    def _unit_numel(self, unit: nn.Module) -> int:
        return sum(b.layout.padded_numel for b in self.unit_buckets[unit])

    def gather_now(self, unit: nn.Module) -> None:
        for b in self.unit_buckets[unit]:
            b.gather()

    def wait(self, unit: nn.Module) -> None:
        for b in self.unit_buckets[unit]:
            b.wait_gathered()

    def prefetch(self, unit: nn.Module | None) -> None:
        if unit is None:
            return
        need = sum(
            b.layout.padded_numel for b in self.unit_buckets[unit] if b.state is ParamsState.SHARDED
        )
        if need == 0 or need > self.options.prefetch_bucket_size:
            return
        if not all(b.readable() for b in self.unit_buckets[unit]):
            return  # its shards are still being updated: gathered (waiting) when it runs
        if self.live_numel() + need > self.options.max_live_parameters:
            return
        self.gather_now(unit)

    def release(self, unit: nn.Module) -> None:
        """Free the unit's buckets unless a unit still running forward needs one of them."""
        keep = {id(b) for u in self._active for b in self.unit_buckets[u]}
        for b in self.unit_buckets[unit]:
            if id(b) not in keep:
                b.release()

    def release_all(self) -> None:
        for b in self.all_buckets:
            b.release()

    def _neighbour(self, unit: nn.Module, step: int) -> nn.Module | None:
        if not self.order_recorded:
            return None
        try:
            i = self.forward_order.index(unit) + step
        except ValueError:
            return None
        return self.forward_order[i] if 0 <= i < len(self.forward_order) else None

    # ---- hooks ------------------------------------------------------------------------------
    def _make_pre_forward(self, unit: nn.Module) -> Callable[..., None]:
        def pre_forward(module: nn.Module, args: object) -> None:
            del module, args
            if _in_backward():
                self.gather_now(unit)
                self.wait(unit)
                return
            if unit is self.root:
                self._active.clear()
            self._active.append(unit)
            if not self.order_recorded and unit not in self.forward_order:
                self.forward_order.append(unit)
            self.gather_now(unit)
            self.prefetch(self._neighbour(unit, +1))
            self.wait(unit)

        return pre_forward

    def _make_post_forward(self, unit: nn.Module) -> Callable[..., object]:
        def post_forward(module: nn.Module, args: object, output: object) -> object:
            del module, args
            if _in_backward():
                return output
            if self._active and self._active[-1] is unit:
                self._active.pop()
            grad = torch.is_grad_enabled()
            if unit is self.root and not self.order_recorded:
                self.order_recorded = True
                for listener in self.order_listeners:
                    listener(self.forward_order)
            last = self.forward_order[-1] if self.forward_order else None
            keep = grad and (
                unit is self.root
                or (unit is last and self._unit_numel(unit) <= self.options.max_reuse_distance)
            )
            if not keep:
                self.release(unit)
            if grad:
                for t in _grad_tensors(output):
                    t.register_hook(self._make_pre_backward(unit))
            return output

        return post_forward

    def _make_pre_backward(self, unit: nn.Module) -> Callable[[torch.Tensor], None]:
        def pre_backward(grad: torch.Tensor) -> None:
            del grad
            self.on_backward_start()
            if id(unit) in self._backward_gathered:
                return
            self._backward_gathered.add(id(unit))
            self.gather_now(unit)
            self.prefetch(self._neighbour(unit, -1))
            self.wait(unit)

        return pre_backward

    def finish_backward(self) -> None:
        self._backward_gathered.clear()
        self.release_all()
