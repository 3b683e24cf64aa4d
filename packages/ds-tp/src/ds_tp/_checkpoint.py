"""Activation checkpointing with the kept inputs split over the tensor-parallel group
(DeepSpeed's ``partition_activations``).

Inside a tensor-parallel region every rank holds the same activations; a checkpointed block
keeps only its inputs, and here each rank keeps ``1/tp`` of each (a slice of the flattened
tensor). Backward all-gathers them, re-runs the block with the forward's RNG state (dropout
masks repeat) and back-propagates through it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ds_tp._mappings import group_rank, group_size


def _slice(t: torch.Tensor, group: Any) -> torch.Tensor:
    world, rank = group_size(group), group_rank(group)
    flat = t.detach().reshape(-1)
    per = -(-flat.numel() // world)
    flat = torch.nn.functional.pad(flat, (0, per * world - flat.numel()))
    return flat[rank * per : (rank + 1) * per].clone()


def _unslice(part: torch.Tensor, shape: torch.Size, group: Any) -> torch.Tensor:
    n = shape.numel()
    if group_size(group) == 1:
        return part[:n].view(shape)
    parts = [torch.empty_like(part) for _ in range(group_size(group))]
    dist.all_gather(parts, part.contiguous(), group=group)
    return torch.cat(parts)[:n].view(shape)


class _PartitionedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, function: Any, group: Any, *args: Any) -> Any:  # type: ignore[override]
        ctx.function, ctx.group = function, group
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        ctx.layout = []  # per arg: None (kept as is) or (shape, requires_grad)
        kept, saved = [], []
        for a in args:
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                ctx.layout.append((a.shape, a.requires_grad))
                saved.append(_slice(a, group))
                kept.append(None)
            else:
                ctx.layout.append(None)
                kept.append(a)
        ctx.kept = kept
        ctx.save_for_backward(*saved)
        with torch.no_grad():
            return function(*args)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:  # type: ignore[override]
        parts = iter(ctx.saved_tensors)
        inputs = []
        for kept, layout in zip(ctx.kept, ctx.layout):
            if layout is None:
                inputs.append(kept)
                continue
            shape, requires_grad = layout
            inputs.append(_unslice(next(parts), shape, ctx.group).requires_grad_(requires_grad))
        devices = list(range(torch.cuda.device_count())) if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state_all(ctx.cuda_rng)
            with torch.enable_grad():
                out = ctx.function(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [
            (o, g) for o, g in zip(outs, grads) if isinstance(o, torch.Tensor) and o.requires_grad
        ]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, *(i.grad if isinstance(i, torch.Tensor) else None for i in inputs))


def partitioned_checkpoint(function: Any, group: Any, *args: Any) -> Any:
    """``function(*args)`` recomputed in backward, its floating-point inputs kept as 1/tp slices
    over ``group`` (all ranks of the group must pass the same inputs). ``group=None``: plain
    reentrant checkpointing."""
    return _PartitionedCheckpoint.apply(function, group, *args)
