"""``deepspeed.runtime.swap_tensor``: the ``aio`` section and tensor swapping through an async IO
handle, under DeepSpeed's path (ds_offload's engine). DeepSpeed's stage-3 swapper classes
(``AsyncPartitionedParameterSwapper``, ``PartitionedOptimizerSwapper``, ``SwapBufferManager``)
are internals of its ZeRO implementation; ds_offload's counterparts are ``NvmeParamStore`` and
``OffloadStepper``, with their own interfaces, and are not aliased here."""

from ds_all.runtime.swap_tensor import aio_config, constants, utils
from ds_all.runtime.swap_tensor.utils import MIN_SWAPPABLE_BYTES

__all__ = ["MIN_SWAPPABLE_BYTES", "aio_config", "constants", "utils"]
