"""``deepspeed.zero``: ``Init``, ``GatheredParameters`` and the external-parameter registry,
with DeepSpeed's signatures, over ds_zero."""

from ds_all.runtime.zero.partition_parameters import (
    GatheredParameters,
    Init,
    register_external_parameter,
    unregister_external_parameter,
)

__all__ = [
    "GatheredParameters",
    "Init",
    "register_external_parameter",
    "unregister_external_parameter",
]
