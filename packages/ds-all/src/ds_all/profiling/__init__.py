"""``deepspeed.profiling``: the flops profiler (ds-profile)."""

from ds_all.profiling import flops_profiler

__all__ = ["flops_profiler"]
