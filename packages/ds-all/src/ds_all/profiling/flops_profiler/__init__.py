"""``deepspeed.profiling.flops_profiler``: DeepSpeed's names, implemented by ds-profile."""

from ds_all.profiling.flops_profiler import profiler
from ds_all.profiling.flops_profiler.profiler import *  # noqa: F403  (the same names)

__all__ = list(profiler.__all__)
