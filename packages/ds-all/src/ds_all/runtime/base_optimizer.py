"""``deepspeed.runtime.base_optimizer``: the optimizer base classes clients test against.

DeepSpeed's engine hands out its ZeRO optimizer (a ``ZeROOptimizer``); clients such as
Accelerate use ``isinstance(opt, DeepSpeedOptimizer)`` to recognise an engine-owned optimizer.
ds_all's engine hands out the user's ``torch.optim.Optimizer`` itself (ZeRO re-points it at the
fp32 master partitions), which such checks accept as an ``Optimizer``; these classes exist so
that code importing them and testing against them keeps working."""

from __future__ import annotations

import abc


class DeepSpeedOptimizer(abc.ABC):  # noqa: B024  (a marker for isinstance checks)
    """Marker base of optimizers owned by a DeepSpeed engine."""


class ZeROOptimizer(DeepSpeedOptimizer):  # noqa: B024
    """Marker base of ZeRO-partitioned optimizers."""


__all__ = ["DeepSpeedOptimizer", "ZeROOptimizer"]
