"""``deepspeed.compression.helper``: DeepSpeed 0.19.8's deprecated home of
``recursive_getattr`` / ``recursive_setattr`` (DeepSpeed-Chat imports them from here); importing
it warns, as DeepSpeed's does, and points at ``deepspeed.utils.module_utils``."""

import warnings

from ds_all.utils.module_utils import recursive_getattr, recursive_setattr

warnings.warn(
    "deepspeed.compression.helper is deprecated; import recursive_getattr and recursive_setattr "
    "from deepspeed.utils.module_utils instead",
    FutureWarning,
    stacklevel=2,
)

__all__ = ["recursive_getattr", "recursive_setattr"]
