"""Activation checkpointing whose kept inputs live in host memory.

Under activation checkpointing the only activations kept between forward and backward are each
layer's input hidden states: ``[bs, seq, hidden]`` per layer, which at long sequence lengths is
the largest memory left (28 layers x 128K tokens x 3072 x 2 bytes = 22 GB for a 3B model).
``checkpoint_offload`` keeps that input in (pinned) host memory instead, copies it back when
backward reaches the layer, and recomputes the layer there. DeepSpeed's ALST gets the same from
``CheckpointHiddenStatesOffload`` (a saved-tensors hook over transformers' reentrant
checkpointing); here it is the checkpoint function itself, installed on a model's layers by
:func:`enable_checkpoint_offload` (per instance, no class patching).

The device-to-host copy is issued on the current stream, so it is ordered after the kernel that
produced the hidden states and before any reuse of their memory; the copy back is issued when
the layer's backward starts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

#: tensors smaller than this stay where they are (offloading them saves nothing worth a copy)
MIN_OFFLOAD_BYTES = 1024


def _to_host(t: Tensor, force: bool) -> tuple[Tensor, torch.device | None]:
    """(host copy, device to restore to) or (t, None) when ``t`` stays where it is."""
    if t.numel() * t.element_size() < MIN_OFFLOAD_BYTES or (t.device.type == "cpu" and not force):
        return t, None
    pin = t.device.type == "cuda"
    host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
    host.copy_(t.detach(), non_blocking=pin)
    return host, t.device


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, run: Callable[..., Any], force: bool, *args: Any) -> Any:  # type: ignore[override]
        ctx.run = run
        ctx.grad_flags = [isinstance(a, Tensor) and a.requires_grad for a in args]
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = None
        devices = {a.device for a in args if isinstance(a, Tensor) and a.device.type == "cuda"}
        if devices:
            ctx.cuda_rng = [(d, torch.cuda.get_rng_state(d)) for d in devices]
        kept: list[Any] = []
        for a in args:
            kept.append(_to_host(a, force) if isinstance(a, Tensor) else (a, None))
        ctx.kept = kept
        with torch.no_grad():
            return run(*args)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        inputs = []
        for (value, device), needs in zip(ctx.kept, ctx.grad_flags, strict=True):
            if isinstance(value, Tensor):
                restored = value.to(device, non_blocking=True) if device is not None else value
                value = restored.detach().requires_grad_(needs)
            inputs.append(value)
        ctx.kept = None
        # replay dropout and other random ops exactly as the forward drew them
        devices = [d for d, _ in ctx.cuda_rng] if ctx.cuda_rng else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.cpu_rng)
            for d, state in ctx.cuda_rng or ():
                torch.cuda.set_rng_state(state, d)
            with torch.enable_grad():
                outputs = ctx.run(*inputs)
        outs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outs, grads, strict=False)
                 if isinstance(o, Tensor) and o.requires_grad and g is not None]  # fmt: skip
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        arg_grads = tuple(
            i.grad if isinstance(i, Tensor) and needs else None
            for i, needs in zip(inputs, ctx.grad_flags, strict=True)
        )
        return (None, None, *arg_grads)


def checkpoint_offload(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``function(*args)`` as an activation checkpoint whose tensor arguments are kept in host
    memory until backward. ``use_reentrant`` and other ``torch.utils.checkpoint`` keywords are
    accepted and ignored (this is always a reentrant-style checkpoint); ``offload_cpu_inputs``
    (default False) also copies arguments that already live on the CPU (for tests)."""
    force = bool(kwargs.pop("offload_cpu_inputs", False))
    for name in ("use_reentrant", "preserve_rng_state", "determinism_check", "debug"):
        kwargs.pop(name, None)
    if kwargs:
        raise TypeError(f"checkpoint_offload: unexpected keyword arguments {sorted(kwargs)}; bind them "
                        "into the function (functools.partial)")  # fmt: skip
    return _OffloadedCheckpoint.apply(function, force, *args)


def enable_checkpoint_offload(model: nn.Module) -> int:
    """Turn on activation checkpointing of a transformers model (if it is not on yet) with
    :func:`checkpoint_offload` as the checkpoint function of its layers: the hidden states
    between layers wait for backward in host memory. Returns how many layers use it."""
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if callable(enable) and not getattr(model, "is_gradient_checkpointing", False):
        enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    count = 0
    for module in model.modules():
        if hasattr(module, "_gradient_checkpointing_func") or getattr(
            module, "gradient_checkpointing", False
        ):
            module._gradient_checkpointing_func = checkpoint_offload  # type: ignore[assignment]
            count += int(bool(getattr(module, "gradient_checkpointing", False)))
    if count == 0:
        raise ValueError(
            f"enable_checkpoint_offload: {type(model).__name__} has no layer with gradient "
            "checkpointing; wrap the layers yourself with ds_seq.checkpoint_offload(layer, hidden)"
        )
    return count
