"""Activation checkpointing: ``ds_all.checkpointing.checkpoint(function, *args)``.

Recomputes ``function`` in backward instead of keeping its activations; with
``configure(cpu_checkpointing=True)`` (or the config's ``activation_checkpointing`` section) the
inputs it does keep are moved to CPU memory until backward needs them.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.utils.checkpoint as _cp

_settings: dict[str, Any] = {"cpu_checkpointing": False}


def configure(mpu_: Any = None, deepspeed_config: Any = None, partition_activations: bool | None = None,
              contiguous_checkpointing: bool | None = None, num_checkpoints: int | None = None,
              checkpoint_in_cpu: bool | None = None, synchronize: bool | None = None,
              profile: bool | None = None, cpu_checkpointing: bool | None = None) -> None:  # fmt: skip
    """DeepSpeed's signature; the settings that apply here are the CPU placement flags."""
    del mpu_, partition_activations, contiguous_checkpointing, num_checkpoints, synchronize, profile
    if deepspeed_config is not None:
        # As DeepSpeed: Megatron-style scripts pass the JSON path (args.deepspeed_config); a dict
        # or a loaded DeepSpeedConfig works too. The file's errors name its keys as usual.
        from ds_all._config import DeepSpeedConfig

        section = DeepSpeedConfig.load(deepspeed_config).activation_checkpointing
        _settings["cpu_checkpointing"] = bool(section.cpu_checkpointing)
    for flag in (checkpoint_in_cpu, cpu_checkpointing):
        if flag is not None:
            _settings["cpu_checkpointing"] = bool(flag)


def is_configured() -> bool:
    return True


def checkpoint(function: Any, *args: Any) -> Any:
    """Run ``function(*args)`` without keeping its intermediate activations for backward."""
    ctx = (
        torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
        if _settings["cpu_checkpointing"]
        else contextlib.nullcontext()
    )
    with ctx:
        return _cp.checkpoint(function, *args, use_reentrant=False)


__all__ = ["checkpoint", "configure", "is_configured"]
