"""``deepspeed.ops.adam``: ``DeepSpeedCPUAdam`` and ``FusedAdam`` (ds_kernels')."""

from ds_kernels import CPUAdam as DeepSpeedCPUAdam
from ds_kernels import FusedAdam

__all__ = ["DeepSpeedCPUAdam", "FusedAdam"]
