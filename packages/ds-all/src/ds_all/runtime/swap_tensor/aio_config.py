"""``deepspeed.runtime.swap_tensor.aio_config``: ``get_aio_config(param_dict)``, the ``aio``
section as DeepSpeed's dict, checked by ds_offload's ``AioConfig`` (unknown keys and bad values
are errors naming the key; ``use_gds`` is refused, ds_offload has no GPUDirect Storage)."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from ds_all.runtime.swap_tensor.constants import (
    AIO,
    AIO_BLOCK_SIZE,
    AIO_BLOCK_SIZE_DEFAULT,
    AIO_INTRA_OP_PARALLELISM,
    AIO_INTRA_OP_PARALLELISM_DEFAULT,
    AIO_OVERLAP_EVENTS,
    AIO_OVERLAP_EVENTS_DEFAULT,
    AIO_QUEUE_DEPTH,
    AIO_QUEUE_DEPTH_DEFAULT,
    AIO_SINGLE_SUBMIT,
    AIO_SINGLE_SUBMIT_DEFAULT,
    AIO_USE_GDS,
    AIO_USE_GDS_DEFAULT,
)

#: the section's defaults (read-only: ``dict(AIO_DEFAULT_DICT)`` for a copy to change)
AIO_DEFAULT_DICT = MappingProxyType({
    AIO_BLOCK_SIZE: AIO_BLOCK_SIZE_DEFAULT,
    AIO_QUEUE_DEPTH: AIO_QUEUE_DEPTH_DEFAULT,
    AIO_INTRA_OP_PARALLELISM: AIO_INTRA_OP_PARALLELISM_DEFAULT,
    AIO_SINGLE_SUBMIT: AIO_SINGLE_SUBMIT_DEFAULT,
    AIO_OVERLAP_EVENTS: AIO_OVERLAP_EVENTS_DEFAULT,
    AIO_USE_GDS: AIO_USE_GDS_DEFAULT,
})  # fmt: skip


def aio_dict(config: Any) -> dict[str, Any]:
    """DeepSpeed's dict from ds_offload's ``AioConfig`` (``thread_count`` is DeepSpeed's
    ``intra_op_parallelism``)."""
    return {
        AIO_BLOCK_SIZE: config.block_size,
        AIO_QUEUE_DEPTH: config.queue_depth,
        AIO_INTRA_OP_PARALLELISM: config.thread_count,
        AIO_SINGLE_SUBMIT: config.single_submit,
        AIO_OVERLAP_EVENTS: config.overlap_events,
        AIO_USE_GDS: config.use_gds,
    }


def get_aio_config(param_dict: dict[str, Any]) -> dict[str, Any]:
    """The ``aio`` section of a whole config dict, its defaults filled in by ds_offload's
    ``AioConfig`` (which owns the section)."""
    from ds_offload import AioConfig

    return aio_dict(AioConfig.from_dict(param_dict.get(AIO) or {}, AIO))


__all__ = ["AIO_DEFAULT_DICT", "aio_dict", "get_aio_config"]
