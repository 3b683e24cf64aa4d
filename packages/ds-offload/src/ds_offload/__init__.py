"""Optimizer and parameter offload to CPU and NVMe over an async IO engine.

>>> from ds_offload import AsyncIO, OffloadStepper
>>> aio = AsyncIO(block_size=1 << 20, queue_depth=8)
>>> stepper = OffloadStepper({"device": "cpu", "pin_memory": True})   # ds_zero.wrap(..., stepper=)
>>> shards = NvmeParamStore({"device": "nvme", "nvme_path": "/nvme"})  # ds_zero.wrap(..., param_store=)
"""

from typing import Any

from ds_offload._aio import AsyncIO
from ds_offload._errors import AioError, NvmePathError, OffloadWarning
from ds_offload._options import (
    AioOptions,
    OffloadDevice,
    OffloadOptimizerOptions,
    OffloadParamOptions,
)
from ds_offload._param import ParamOffloader
from ds_offload._param_store import NvmeParamStore
from ds_offload._pinned import DIRECT_ALIGN, aligned_empty, memlock_limit
from ds_offload._stepper import OffloadStepper
from ds_offload._threads import cpu_optimizer_threads
from ds_offload._version import __version__

__all__ = [
    "DIRECT_ALIGN",
    "AioConfig",
    "AioError",
    "AioOptions",
    "AsyncIO",
    "NvmeParamStore",
    "NvmePathError",
    "OffloadDevice",
    "OffloadOptimizerConfig",
    "OffloadOptimizerOptions",
    "OffloadParamConfig",
    "OffloadParamOptions",
    "OffloadStepper",
    "OffloadWarning",
    "ParamOffloader",
    "__version__",
    "aligned_empty",
    "cpu_optimizer_threads",
    "memlock_limit",
]

_PYDANTIC_MODELS = ("AioConfig", "OffloadOptimizerConfig", "OffloadParamConfig")


def __getattr__(name: str) -> Any:
    # The pydantic config models load lazily: the runtime (options dataclasses) works where
    # pydantic is absent, e.g. a GPU machine with only torch.
    if name in _PYDANTIC_MODELS:
        from ds_offload import _config

        return getattr(_config, name)
    raise AttributeError(f"module 'ds_offload' has no attribute {name!r}")
