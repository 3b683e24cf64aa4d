"""``deepspeed.runtime``: the engine, LR schedules, ZeRO and helpers under DeepSpeed's paths.

Each submodule re-exports the package that implements it; further features add their own
submodules here (``runtime.sequence_parallel``, ...)."""

from ds_all.runtime.base_optimizer import DeepSpeedOptimizer, ZeROOptimizer

__all__ = ["DeepSpeedOptimizer", "ZeROOptimizer"]
