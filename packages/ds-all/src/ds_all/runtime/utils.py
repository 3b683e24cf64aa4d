"""``deepspeed.runtime.utils``: small helpers DeepSpeed scripts and clients import."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch


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


__all__ = ["get_global_norm", "is_invalid_grad_norm", "move_to_device", "see_memory_usage"]


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
