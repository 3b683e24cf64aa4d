"""``deepspeed.utils.tensor_fragment``: DeepSpeed's accessors of one parameter's whole fp32
state under ZeRO (``safe_get_full_fp32_param``, ``safe_get_full_optimizer_state``,
``safe_set_full_fp32_param``, ``safe_set_full_optimizer_state``) and gradient (``safe_get_full_grad``,
``safe_set_full_grad``), over ds-zero's ``full_param_state`` / ``full_param_grad`` and their
setters.

Each is a collective over the parameter's data-parallel group: call it on every rank, after
``deepspeed.initialize``. As in DeepSpeed, a parameter no ZeRO engine holds gives ``None``
(and a set does nothing). The gradient is the reduced one ``step()`` applies (fp32, averaged
over the data-parallel group, times the fp16 loss scale, as DeepSpeed's): after the
accumulation boundary's backward and before ``step()``; at ZeRO 2-3 also between
micro-steps (the partial sum), at ZeRO 0-1 not (those accumulate locally: a RuntimeError
says so). The ZeRO-3 local-partition accessors (``safe_get_local_*``) are not provided.
"""

from __future__ import annotations

import torch
from torch import nn

from ds_zero import (
    full_param_grad,
    full_param_state,
    owner_of,
    set_full_param_grad,
    set_full_param_state,
)

__all__ = [
    "safe_get_full_fp32_param",
    "safe_get_full_grad",
    "safe_get_full_optimizer_state",
    "safe_set_full_fp32_param",
    "safe_set_full_grad",
    "safe_set_full_optimizer_state",
]


def safe_get_full_fp32_param(param: nn.Parameter) -> torch.Tensor | None:
    """The parameter's whole fp32 master, in its full shape."""
    if owner_of(param) is None:
        return None
    return full_param_state(param, "master")


def safe_get_full_optimizer_state(param: nn.Parameter, optim_state_key: str) -> torch.Tensor | None:
    """The parameter's whole optimizer state ``optim_state_key`` (``exp_avg``, ...)."""
    if owner_of(param) is None:
        return None
    return full_param_state(param, optim_state_key)


def safe_set_full_fp32_param(param: nn.Parameter, value: torch.Tensor) -> None:
    """Set the parameter's fp32 master (and so the parameter) to ``value``, the same on every
    rank."""
    if owner_of(param) is not None:
        set_full_param_state(param, value, "master")


def safe_set_full_optimizer_state(
    param: nn.Parameter, value: torch.Tensor, optim_state_key: str
) -> None:
    """Set the parameter's optimizer state ``optim_state_key`` to ``value``, the same on
    every rank."""
    if owner_of(param) is not None:
        set_full_param_state(param, value, optim_state_key)


def safe_get_full_grad(param: nn.Parameter) -> torch.Tensor | None:
    """The parameter's whole reduced gradient (fp32), in its full shape; ``param.grad`` for a
    parameter no ZeRO engine holds (None without one), as DeepSpeed."""
    if owner_of(param) is None:
        return param.grad
    return full_param_grad(param)


def safe_set_full_grad(param: nn.Parameter, value: torch.Tensor) -> None:
    """Replace the parameter's reduced gradient by ``value`` (the same on every rank) before
    ``step()``; for a parameter no ZeRO engine holds, its ``.grad`` if it has one."""
    if owner_of(param) is not None:
        set_full_param_grad(param, value)
    elif param.grad is not None:
        param.grad.copy_(value)
