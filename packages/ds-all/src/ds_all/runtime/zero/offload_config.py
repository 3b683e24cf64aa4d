"""``deepspeed.runtime.zero.offload_config``: the ``offload_param`` / ``offload_optimizer``
sections of ``zero_optimization`` (ds_offload's models, which own them).

Same keys and defaults as DeepSpeed's, plus ds_offload's extensions (``overlap``,
``delayed_update``, ...); ``DeepSpeedZeroOffloadOptimizerConfig(...).pipeline`` is
``pipeline_read or pipeline_write`` as there. The models are frozen: build a new one (or
``model_copy(update=...)``) instead of assigning to a field.
"""

from ds_offload import OffloadDevice as OffloadDeviceEnum
from ds_offload import OffloadOptimizerConfig as DeepSpeedZeroOffloadOptimizerConfig
from ds_offload import OffloadParamConfig as DeepSpeedZeroOffloadParamConfig

__all__ = [
    "DeepSpeedZeroOffloadOptimizerConfig",
    "DeepSpeedZeroOffloadParamConfig",
    "OffloadDeviceEnum",
]
