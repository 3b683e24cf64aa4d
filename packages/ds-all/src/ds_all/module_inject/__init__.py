"""``deepspeed.module_inject``: the AutoTP training pieces (layers and partition specs), each a
re-export of ds-tp."""

from ds_all.module_inject import autotp_config, layers
from ds_all.module_inject.layers import LinearAllreduce, LinearLayer

__all__ = ["LinearAllreduce", "LinearLayer", "autotp_config", "layers"]
