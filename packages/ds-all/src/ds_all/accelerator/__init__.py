"""``deepspeed.accelerator``: the accelerator abstraction (ds_accel's)."""

from ds_accel import Accelerator as DeepSpeedAccelerator
from ds_accel import get_accelerator, set_accelerator

__all__ = ["DeepSpeedAccelerator", "get_accelerator", "set_accelerator"]
