"""Optimizer and parameter offload to CPU and NVMe over an async IO engine.

>>> from ds_offload import AsyncIO, OffloadStepper
>>> aio = AsyncIO(block_size=1 << 20, queue_depth=8)
>>> stepper = OffloadStepper({"device": "cpu", "pin_memory": True})   # ds_zero.wrap(..., stepper=)
"""

from ds_offload._aio import AsyncIO
from ds_offload._config import (
    AioConfig,
    OffloadDevice,
    OffloadOptimizerConfig,
    OffloadParamConfig,
)
from ds_offload._errors import AioError, NvmePathError, OffloadWarning
from ds_offload._param import ParamOffloader
from ds_offload._pinned import aligned_empty, memlock_limit
from ds_offload._stepper import OffloadStepper
from ds_offload._version import __version__

__all__ = [
    "AioConfig",
    "AioError",
    "AsyncIO",
    "NvmePathError",
    "OffloadDevice",
    "OffloadOptimizerConfig",
    "OffloadParamConfig",
    "OffloadStepper",
    "OffloadWarning",
    "ParamOffloader",
    "__version__",
    "aligned_empty",
    "memlock_limit",
]
