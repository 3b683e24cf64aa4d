"""Activation checkpointing whose kept inputs live in host memory.

Under activation checkpointing the only activations kept between forward and backward are each
layer's input hidden states: ``[bs, seq, hidden]`` per layer, which at long sequence lengths is
the largest memory left (28 layers x 128K tokens x 3072 x 2 bytes = 22 GB for a 3B model).
``checkpoint_offload`` keeps that input in (pinned) host memory instead, copies it back when
backward reaches the layer, and recomputes the layer there. DeepSpeed's ALST gets the same from
``CheckpointHiddenStatesOffload`` (a saved-tensors hook over transformers' reentrant
checkpointing); here it is the checkpoint function itself, installed on a model's layers by
:func:`enable_checkpoint_offload` (per instance, no class patching).

The device-to-host copy is issued on a side stream that waits for the current one, so it is
ordered after the kernel that produced the hidden states, and the device tensor is recorded on
that stream, so its memory is not reused before the copy ends; the copy back is issued when the
layer's backward starts. Host buffers are page-locked at exactly their size (the accelerator's
``pinned_empty``): torch's pinned allocator rounds each one up to a power of two, up to twice
the host memory at some lengths, and host memory bounds the longest sequence once the hidden
states of every layer live there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ds_accel import get_accelerator

#: tensors smaller than this stay where they are (offloading them saves nothing worth a copy)
MIN_OFFLOAD_BYTES = 1024


class HiddenStatesOffload:
    """Keeps checkpointed layer inputs in pinned host memory between forward and backward.

    One object per model (``enable_checkpoint_offload`` makes it): it owns a pool of pinned host
    buffers reused from step to step (page-locking memory is slow, and a long sequence needs
    gigabytes a layer) and, on CUDA, a side stream for the device-to-host copies so that they
    overlap the next layer's forward. ``checkpoint`` is its checkpoint function.

    ``keep_on_device_bytes``: up to this many bytes of checkpointed inputs per step stay on the
    device instead (the first layers' in forward order, as long as they fit; 0, the default,
    offloads all). Host memory bounds the longest sequence once every layer's input lives there
    (28 layers x 6 KB a token for a 3B model); where the device has room left at its peak,
    keeping some inputs there moves that bound. The kept bytes add to the device's peak at
    most one for one, so a budget no larger than the room the device had with everything
    offloaded is safe. DeepSpeed's ``keep_last_count`` keeps the last layer's input.
    """

    def __init__(
        self,
        min_offload_bytes: int = MIN_OFFLOAD_BYTES,
        offload_cpu_inputs: bool = False,
        keep_on_device_bytes: int = 0,
    ) -> None:
        if keep_on_device_bytes < 0:
            raise ValueError(
                f"HiddenStatesOffload: keep_on_device_bytes must be >= 0, got {keep_on_device_bytes}"
            )
        self.min_offload_bytes = min_offload_bytes
        # copy CPU tensors too (a CPU run has nothing to offload; tests use it)
        self.offload_cpu_inputs = offload_cpu_inputs
        self.keep_on_device_bytes = int(keep_on_device_bytes)
        self._kept_bytes = 0  # of inputs kept on the device whose backward has not run yet
        self._pool: dict[tuple[tuple[int, ...], torch.dtype], list[Tensor]] = {}
        self._stream: Any = None

    def checkpoint(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``function(*args)`` as an activation checkpoint (transformers' signature for
        ``_gradient_checkpointing_func``); ``torch.utils.checkpoint`` keywords are ignored:
        this is always a reentrant-style checkpoint."""
        for name in ("use_reentrant", "preserve_rng_state", "determinism_check", "debug"):
            kwargs.pop(name, None)
        if kwargs:
            raise TypeError(f"checkpoint: unexpected keyword arguments {sorted(kwargs)}; bind them into the "
                            "function (functools.partial)")  # fmt: skip
        return _OffloadedCheckpoint.apply(function, self, *args)

    def pooled_bytes(self) -> int:
        """Host memory the pool holds now (buffers waiting for reuse)."""
        return sum(t.numel() * t.element_size() for ts in self._pool.values() for t in ts)

    def kept_bytes(self) -> int:
        """Bytes of checkpointed inputs kept on the device now (waiting for their backward)."""
        return self._kept_bytes

    def release_buffers(self) -> int:
        """Drop the pooled host buffers (between backward passes; when the sequence length
        changes, the buffers of the old shapes would otherwise stay page-locked) and forget
        inputs kept on the device by a forward whose backward never ran. Returns the bytes
        released."""
        if self._stream is not None:
            self._stream.synchronize()  # no copy into or out of a buffer is still running
        released = self.pooled_bytes()
        self._pool.clear()
        self._kept_bytes = 0
        return released

    def keeps(self, t: Tensor) -> bool:
        """Whether ``t`` stays on the device under ``keep_on_device_bytes`` (counted if so)."""
        n = t.numel() * t.element_size()
        if n < self.min_offload_bytes or self._kept_bytes + n > self.keep_on_device_bytes:
            return False
        if t.device.type == "cpu" and not self.offload_cpu_inputs:
            return False  # nothing to keep: a CPU tensor stays where it is anyway
        self._kept_bytes += n
        return True

    def done_with_kept(self, nbytes: int) -> None:
        """The backward of inputs kept on the device ran: their bytes leave the budget."""
        self._kept_bytes = max(0, self._kept_bytes - nbytes)

    # ---- used by _OffloadedCheckpoint -------------------------------------------------------
    def offload(self, t: Tensor) -> tuple[Tensor, torch.device | None]:
        """(host copy, device to restore to), or (t, None) when ``t`` stays where it is."""
        if t.numel() * t.element_size() < self.min_offload_bytes:
            return t, None
        if t.device.type == "cpu":
            return (t.detach().clone(), t.device) if self.offload_cpu_inputs else (t, None)
        key = (tuple(t.shape), t.dtype)
        free = self._pool.get(key)
        host = free.pop() if free else _host_buffer(t)
        if t.device.type == "cuda":
            if self._stream is None:
                self._stream = torch.cuda.Stream(device=t.device)
            current = torch.cuda.current_stream(t.device)
            # after the kernel that wrote t, and after the copy back that last read this buffer
            self._stream.wait_stream(current)
            with torch.cuda.stream(self._stream):
                host.copy_(t.detach(), non_blocking=True)
            t.record_stream(self._stream)  # t's memory is not reused before the copy ends
        else:
            host.copy_(t.detach())
        return host, t.device

    def restore(self, host: Tensor, device: torch.device) -> Tensor:
        if device.type == "cpu":
            return host
        if self._stream is not None:
            torch.cuda.current_stream(device).wait_stream(self._stream)
        out = host.to(device, non_blocking=True)
        # later copies into this buffer are ordered after this one (offload waits on the stream)
        self._pool.setdefault((tuple(host.shape), host.dtype), []).append(host)
        return out


def _host_buffer(t: Tensor) -> Tensor:
    """An uninitialised host tensor shaped as ``t``: page-locked at its exact size where ``t``
    lives on a CUDA device, pageable where no memory is left to lock (slower copies, same
    values)."""
    if t.device.type == "cuda":
        try:
            return get_accelerator().pinned_empty(tuple(t.shape), t.dtype)
        except RuntimeError:
            pass
    return torch.empty(t.shape, dtype=t.dtype)


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, run: Callable[..., Any], store: HiddenStatesOffload, *args: Any) -> Any:  # type: ignore[override]
        ctx.run = run
        ctx.store = store
        ctx.grad_flags = [isinstance(a, Tensor) and a.requires_grad for a in args]
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = None
        devices = {a.device for a in args if isinstance(a, Tensor) and a.device.type == "cuda"}
        if devices:
            ctx.cuda_rng = [(d, torch.cuda.get_rng_state(d)) for d in devices]
        kept, on_device = [], []
        for a in args:
            if isinstance(a, Tensor) and store.keeps(a):
                kept.append((a, None))
                # an in-place change before backward would recompute from other values
                on_device.append((a, a._version))
            else:
                kept.append(store.offload(a) if isinstance(a, Tensor) else (a, None))
        ctx.kept, ctx.on_device = kept, on_device
        with torch.no_grad():
            return run(*args)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        for t, version in ctx.on_device:
            if t._version != version:
                raise RuntimeError(
                    "checkpoint_offload: an input kept on the device (keep_on_device_bytes) was "
                    "modified in place after the forward; clone it before changing it"
                )
        ctx.store.done_with_kept(sum(t.numel() * t.element_size() for t, _ in ctx.on_device))
        ctx.on_device = None
        inputs = []
        for (value, device), needs in zip(ctx.kept, ctx.grad_flags, strict=True):
            if isinstance(value, Tensor):
                restored = ctx.store.restore(value, device) if device is not None else value
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
    """``function(*args)`` as an activation checkpoint whose tensor arguments wait for backward
    in host memory (a one-off :class:`HiddenStatesOffload`, no buffer reuse across calls; use
    ``enable_checkpoint_offload`` or your own ``HiddenStatesOffload`` for a model).
    ``offload_cpu_inputs=True`` copies CPU tensors too (for tests)."""
    force = bool(kwargs.pop("offload_cpu_inputs", False))
    return HiddenStatesOffload(offload_cpu_inputs=force).checkpoint(function, *args, **kwargs)


def enable_checkpoint_offload(
    model: nn.Module, offload: HiddenStatesOffload | None = None
) -> HiddenStatesOffload:
    """Turn on activation checkpointing of a transformers model (if it is not on yet) with
    ``offload.checkpoint`` (a new :class:`HiddenStatesOffload` by default) as the checkpoint
    function of its layers: the hidden states between layers wait for backward in pinned host
    memory. Returns the offload object (its buffer pool lives as long as the model's layers)."""
    offload = offload or HiddenStatesOffload()
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if callable(enable) and not getattr(model, "is_gradient_checkpointing", False):
        enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    count = 0
    for module in model.modules():
        if hasattr(module, "_gradient_checkpointing_func") or getattr(
            module, "gradient_checkpointing", False
        ):
            module._gradient_checkpointing_func = offload.checkpoint  # type: ignore[assignment]
            count += int(bool(getattr(module, "gradient_checkpointing", False)))
    if count == 0:
        raise ValueError(
            f"enable_checkpoint_offload: {type(model).__name__} has no layer with gradient "
            "checkpointing; wrap the layers yourself with ds_seq.checkpoint_offload(layer, hidden)"
        )
    return offload
