"""Activation checkpointing: ``ds_all.checkpointing.checkpoint(function, *args)``.

Recomputes ``function`` in backward instead of keeping its activations; with
``configure(cpu_checkpointing=True)`` (or the config's ``activation_checkpointing`` section) the
inputs it does keep are moved to CPU memory until backward needs them. The RNG states of
``get_cuda_rng_tracker()`` (tensor-parallel dropout) are replayed on recompute, so a
checkpointed block draws the same dropout masks twice. This module is also
``ds_all.runtime.activation_checkpointing.checkpointing``, as in DeepSpeed.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
import torch.utils.checkpoint as _cp

from ds_all._rng_tracker import (
    MODEL_PARALLEL_RNG_TRACKER_NAME,
    CudaRNGStatesTracker,
    seeded_state,
    tensor_parallel_rank,
)

# DeepSpeed's API is process-wide (configure() once, checkpoint() anywhere, one tracker that
# Megatron's layers fork), so the settings and the tracker live here, one per process.
_settings: dict[str, Any] = {
    "cpu_checkpointing": False,
    "partition_activations": False,
    "partition_group": None,
    "mpu": None,
}
_TRACKER = CudaRNGStatesTracker()


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
        _settings["mpu"] = mpu_
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


def partition_activations_in_checkpoint(partition_activation: bool) -> None:
    """Turn the splitting of kept inputs over the tensor-parallel group on or off."""
    _settings["partition_activations"] = bool(partition_activation)


def set_num_layers(nlayers: int) -> None:
    """DeepSpeed sizes its contiguous checkpoint buffers by this; there are no such buffers
    here (as ``configure``'s ``num_checkpoints``, it is accepted and has no effect)."""
    del nlayers


def reset() -> None:
    """DeepSpeed frees its contiguous checkpoint buffers between evaluation passes; nothing
    outlives a forward pass here, so there is nothing to free."""


# ---------------------------------------------------------------- tensor-parallel RNG states
def get_cuda_rng_tracker() -> CudaRNGStatesTracker:
    """The process's tracker of named RNG states (Megatron forks it for dropout)."""
    return _TRACKER


def model_parallel_cuda_manual_seed(seed: int) -> None:
    """Seed the default accelerator generator with ``seed`` (the same on every tensor-parallel
    rank) and track ``model-parallel-rng`` seeded with ``seed + 2718 + tp_rank`` (different
    per tensor-parallel rank), the tp rank taken from the mpu given to :func:`configure`."""
    from ds_accel import get_accelerator

    tp_seed = seed + 2718 + tensor_parallel_rank(_settings["mpu"])
    _TRACKER.reset()
    get_accelerator().set_rng_state(seeded_state(seed))
    _TRACKER.add(MODEL_PARALLEL_RNG_TRACKER_NAME, tp_seed)


def model_parallel_reconfigure_tp_seed(seed: int) -> None:
    """Reseed the tracked ``model-parallel-rng`` state as :func:`model_parallel_cuda_manual_seed`
    would, leaving the default generator alone."""
    from ds_accel import get_accelerator

    tp_seed = seed + 2718 + tensor_parallel_rank(_settings["mpu"])
    with _TRACKER.fork():
        get_accelerator().set_rng_state(seeded_state(tp_seed))


def _replaying_tracker(function: Any) -> Any:
    """``function`` whose second and later calls (recomputes) run on the tracker states of the
    first call (the forward), so forked dropout repeats; the tracker then continues from where
    the forward left it."""
    if not _TRACKER.states_:
        return function
    at_forward = _TRACKER.get_states()
    calls = 0

    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            return function(*args, **kwargs)
        after_forward = _TRACKER.get_states()
        _TRACKER.set_states(dict(at_forward))
        try:
            return function(*args, **kwargs)
        finally:
            _TRACKER.set_states(after_forward)

    return run


# ---------------------------------------------------------------- checkpointing
def checkpoint(function: Any, *args: Any, **kwargs: Any) -> Any:
    """Run ``function(*args, **kwargs)`` without keeping its intermediate activations for
    backward."""
    function = _replaying_tracker(function)
    group = _settings["partition_group"] if _settings["partition_activations"] else None
    ctx = (
        torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
        if _settings["cpu_checkpointing"]
        else contextlib.nullcontext()
    )
    with ctx:
        if group is not None:
            import ds_tp

            if kwargs:
                function = functools.partial(function, **kwargs)
            # each tensor-parallel rank keeps 1/tp of the (replicated) inputs until backward
            # (in CPU memory too with cpu_checkpointing: the slices are saved tensors)
            return ds_tp.partitioned_checkpoint(function, group, *args)
        return _cp.checkpoint(function, *args, use_reentrant=False, **kwargs)


def non_reentrant_checkpoint(function: Any, *args: Any) -> Any:
    """DeepSpeed's non-reentrant variant: :func:`checkpoint` already is one."""
    return checkpoint(function, *args)


class CheckpointFunction:
    """DeepSpeed's reentrant checkpoint, called as ``CheckpointFunction.apply(run_function,
    all_outputs, *args)``: ``run_function`` runs without grad, its outputs are appended to
    ``all_outputs`` and returned, and backward recomputes it with the forward's RNG states
    (tracker included). As with any reentrant checkpoint, outputs need grad only when some
    tensor input does. Kept inputs are split over the tensor-parallel group when
    ``partition_activations`` is on."""

    @staticmethod
    def apply(run_function: Any, all_outputs: list[Any], *args: Any) -> Any:
        import ds_tp

        group = _settings["partition_group"] if _settings["partition_activations"] else None
        out = ds_tp.partitioned_checkpoint(_replaying_tracker(run_function), group, *args)
        all_outputs.extend(out if isinstance(out, tuple) else (out,))
        return out


__all__ = [
    "CheckpointFunction",
    "CudaRNGStatesTracker",
    "checkpoint",
    "configure",
    "get_cuda_rng_tracker",
    "is_configured",
    "model_parallel_cuda_manual_seed",
    "model_parallel_reconfigure_tp_seed",
    "non_reentrant_checkpoint",
    "partition_activations_in_checkpoint",
    "reset",
    "set_num_layers",
]
