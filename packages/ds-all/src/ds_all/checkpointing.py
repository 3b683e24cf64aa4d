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

_settings: dict[str, Any] = {
    "cpu_checkpointing": False,
    "partition_activations": False,
    "partition_group": None,
}


def configure(mpu_: Any = None, deepspeed_config: Any = None, partition_activations: bool | None = None,
              contiguous_checkpointing: bool | None = None, num_checkpoints: int | None = None,
              checkpoint_in_cpu: bool | None = None, synchronize: bool | None = None,
              profile: bool | None = None, cpu_checkpointing: bool | None = None) -> None:  # fmt: skip
    """DeepSpeed's signature; the settings that apply here are the CPU placement flags and
    ``partition_activations`` (the kept inputs split over the mpu's tensor-parallel group)."""
    del contiguous_checkpointing, num_checkpoints, synchronize, profile
    if deepspeed_config is not None:
        # As DeepSpeed: Megatron-style scripts pass the JSON path (args.deepspeed_config); a dict
        # or a loaded DeepSpeedConfig works too. The file's errors name its keys as usual.
        from ds_all._config import DeepSpeedConfig

        section = DeepSpeedConfig.load(deepspeed_config).activation_checkpointing
        _settings["cpu_checkpointing"] = bool(section.cpu_checkpointing)
        _settings["partition_activations"] = bool(section.partition_activations)
    if partition_activations is not None:
        _settings["partition_activations"] = bool(partition_activations)
    if mpu_ is not None:
        # the ranks holding the same activations: the tensor (slice) group; Megatron's
        # "model parallel" group where that is all an mpu has
        names = (
            "get_tensor_model_parallel_group",
            "get_slice_parallel_group",
            "get_model_parallel_group",
        )
        get = next((getattr(mpu_, n) for n in names if callable(getattr(mpu_, n, None))), None)
        _settings["partition_group"] = get() if callable(get) else None
    for flag in (checkpoint_in_cpu, cpu_checkpointing):
        if flag is not None:
            _settings["cpu_checkpointing"] = bool(flag)


def is_configured() -> bool:
    return True


def checkpoint(function: Any, *args: Any) -> Any:
    """Run ``function(*args)`` without keeping its intermediate activations for backward."""
    group = _settings["partition_group"] if _settings["partition_activations"] else None
    ctx = (
        torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
        if _settings["cpu_checkpointing"]
        else contextlib.nullcontext()
    )
    with ctx:
        if group is not None:
            import ds_tp

            # each tensor-parallel rank keeps 1/tp of the (replicated) inputs until backward
            # (in CPU memory too with cpu_checkpointing: the slices are saved tensors)
            return ds_tp.partitioned_checkpoint(function, group, *args)
        return _cp.checkpoint(function, *args, use_reentrant=False)


__all__ = ["checkpoint", "configure", "is_configured"]
