"""``deepspeed.runtime.zero``: ZeRO under DeepSpeed's path (ds_zero's)."""

from ds_all.runtime.zero import partition_parameters, stage3, stage_1_and_2
from ds_all.runtime.zero.partition_parameters import (
    GatheredParameters,
    Init,
    ZeroParamStatus,
    register_external_parameter,
    unregister_external_parameter,
)

__all__ = [
    "GatheredParameters",
    "Init",
    "ZeroParamStatus",
    "partition_parameters",
    "stage3",
    "stage_1_and_2",
    "register_external_parameter",
    "unregister_external_parameter",
]
