"""``deepspeed.ops.lion``: ``DeepSpeedCPULion`` and ``FusedLion`` (ds_kernels')."""

from ds_kernels import CPULion as DeepSpeedCPULion
from ds_kernels import FusedLion

__all__ = ["DeepSpeedCPULion", "FusedLion"]
