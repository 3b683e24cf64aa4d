"""``deepspeed.runtime``: the engine, LR schedules, ZeRO and helpers under DeepSpeed's paths.

Each submodule re-exports the package that implements it; further features add their own
submodules here (``runtime.sequence_parallel``, ...). The submodules below are imported with
the package because clients reach them as attributes (``deepspeed.runtime.lr_schedules...``)."""

from ds_all.runtime import (
    activation_checkpointing,
    base_optimizer,
    config,
    dataloader,
    engine,
    fp16,
    lr_schedules,
    pipe,
    swap_tensor,
    utils,
    zero,
)
from ds_all.runtime.base_optimizer import DeepSpeedOptimizer, ZeROOptimizer

__all__ = [
    "DeepSpeedOptimizer",
    "ZeROOptimizer",
    "activation_checkpointing",
    "base_optimizer",
    "config",
    "dataloader",
    "engine",
    "fp16",
    "lr_schedules",
    "pipe",
    "swap_tensor",
    "utils",
    "zero",
]
