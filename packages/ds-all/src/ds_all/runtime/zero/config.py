"""``deepspeed.runtime.zero.config``: the ``zero_optimization`` section (ds_zero's model)."""

from __future__ import annotations

import enum

from ds_zero import ZeroConfig as DeepSpeedZeroConfig


class ZeroStageEnum(enum.IntEnum):
    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3
    max_stage = 3


__all__ = ["DeepSpeedZeroConfig", "ZeroStageEnum"]
