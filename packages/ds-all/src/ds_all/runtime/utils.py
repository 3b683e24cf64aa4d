"""``deepspeed.runtime.utils``: small helpers DeepSpeed scripts and clients import."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist


def move_to_device(item: Any, device: torch.device | str, criterion_func: Any = None) -> Any:
    """Move tensors in a nested list/tuple/dict to ``device`` (those for which
    ``criterion_func(tensor)`` is true, when given); other objects are returned as they are."""
    if isinstance(item, torch.Tensor):
        if criterion_func is None or criterion_func(item):
            return item.to(device)
        return item
    if isinstance(item, (list, tuple)):
        return type(item)(move_to_device(v, device, criterion_func) for v in item)
    if isinstance(item, dict):
        return {k: move_to_device(v, device, criterion_func) for k, v in item.items()}
    return item


def see_memory_usage(message: str, force: bool = False) -> None:
    """Log the accelerator's allocated/peak memory with ``message`` (only when ``force``)."""
    if not force:
        return
    from ds_accel import get_accelerator
    from ds_all.utils.logging import logger

    acc = get_accelerator()
    gib = 2**30
    logger.info(
        "%s | allocated %.2f GiB | peak %.2f GiB",
        message,
        acc.memory_allocated() / gib,
        acc.max_memory_allocated() / gib,
    )


__all__ = [
    "clip_grad_norm_",
    "get_global_norm",
    "is_invalid_grad_norm",
    "is_model_parallel_parameter",
    "move_to_device",
    "see_memory_usage",
]


def is_invalid_grad_norm(norm: Any) -> bool:
    """A norm that is infinite, NaN or negative (DeepSpeed's -1 marks an overflow)."""
    if torch.is_tensor(norm):
        return bool((~torch.isfinite(norm) | (norm < 0)).any())
    return not math.isfinite(float(norm)) or norm < 0


def get_global_norm(norm_list: Iterable[Any]) -> float:
    """The 2-norm of several groups' norms (``sqrt(sum(n**2))``), or inf if any is invalid."""
    norms = list(norm_list)
    if any(is_invalid_grad_norm(n) for n in norms):
        return float("inf")
    return math.sqrt(sum(float(n) ** 2 for n in norms))


def is_model_parallel_parameter(p: torch.Tensor) -> bool:
    """Whether ``p`` is split over the model-parallel ranks (Megatron's ``model_parallel`` or
    ``tensor_model_parallel`` attribute): its gradient norm counts on every such rank."""
    return bool(getattr(p, "model_parallel", False) or getattr(p, "tensor_model_parallel", False))


def clip_grad_norm_(
    parameters: torch.Tensor | Iterable[torch.Tensor],
    max_norm: float,
    norm_type: float = 2,
    mpu: Any = None,
) -> torch.Tensor:
    """Clip the gradients of ``parameters`` in place to a total ``norm_type``-norm of at most
    ``max_norm``; returns the total norm before clipping (DeepSpeed's ``clip_grad_norm_``).

    With a Megatron-style ``mpu`` the norm spans the model-parallel ranks: a parameter that
    is not model-parallel (``is_model_parallel_parameter``) counts on model-parallel rank 0
    only, so replicated weights are not counted twice, and the partial sums (the maximum for
    ``inf``) are reduced over ``mpu.get_model_parallel_group()``. As in DeepSpeed, the norm is
    then averaged over the data-parallel group (``mpu.get_data_parallel_group()`` when the
    mpu has one, else the world; nothing without ``torch.distributed``), where the ranks'
    norms differ only with expert (MoE) parameters. The clip coefficient is
    ``min(1, max_norm / (norm + 1e-6))``, applied to every gradient.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    params = [p for p in parameters if p.grad is not None]
    norm_type = float(norm_type)
    if not params:
        raise ValueError(
            "clip_grad_norm_: no parameter has a gradient; call it after backward with the "
            "model's parameters"
        )
    device = params[0].grad.device
    mp_group = mpu.get_model_parallel_group() if mpu is not None else None
    if norm_type == math.inf:
        total = torch.stack([p.grad.detach().abs().max().float() for p in params]).max()
        if mpu is not None:
            dist.all_reduce(total, op=dist.ReduceOp.MAX, group=mp_group)
    else:
        counted = [
            p
            for p in params
            if mpu is None or mpu.get_model_parallel_rank() == 0 or is_model_parallel_parameter(p)
        ]
        if counted:
            norms = torch.stack([p.grad.detach().float().norm(norm_type) for p in counted])
            total = norms.to(device).pow(norm_type).sum()
        else:
            total = torch.zeros((), device=device)
        if mpu is not None:
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=mp_group)
        total = total.pow(1.0 / norm_type)
    if dist.is_available() and dist.is_initialized():
        dp_group = None
        if mpu is not None and hasattr(mpu, "get_data_parallel_group"):
            dp_group = mpu.get_data_parallel_group()
        total = total / float(dist.get_world_size(group=dp_group))
        dist.all_reduce(total, group=dp_group)
    coef = (float(max_norm) / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.detach().mul_(coef.to(p.grad.device, p.grad.dtype))
    return total
