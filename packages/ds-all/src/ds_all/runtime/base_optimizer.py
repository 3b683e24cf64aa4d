"""``deepspeed.runtime.base_optimizer``: the optimizer base classes clients test against.

DeepSpeed's engine hands out its ZeRO optimizer (a ``ZeROOptimizer``); clients such as
Accelerate use ``isinstance(opt, DeepSpeedOptimizer)`` to recognise an engine-owned optimizer.
ds_all's engine hands out the user's ``torch.optim.Optimizer`` (ZeRO re-points it at the fp32
master partitions), which is registered as a virtual subclass by the engine at initialize()."""

from __future__ import annotations

import abc


class DeepSpeedOptimizer(abc.ABC):  # noqa: B024  (a marker for isinstance checks)
    """Marker base of optimizers owned by a DeepSpeed engine."""


class ZeROOptimizer(DeepSpeedOptimizer):  # noqa: B024
    """Marker base of ZeRO-partitioned optimizers."""


__all__ = ["DeepSpeedOptimizer", "ZeROOptimizer"]
