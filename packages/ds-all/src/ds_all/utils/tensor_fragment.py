"""``deepspeed.utils.tensor_fragment``: DeepSpeed's accessors of one parameter's fp32 state
under ZeRO, whole (``safe_get_full_fp32_param``, ``safe_get_full_optimizer_state``,
``safe_set_full_fp32_param``, ``safe_set_full_optimizer_state``, and the gradient's
``safe_get_full_grad``, ``safe_set_full_grad``, ``safe_update_full_grad_vectorized``) over ds-zero's ``full_param_state`` /
``full_param_grad`` and their setters, or this rank's ZeRO-3 piece of it
(``safe_get_local_*`` / ``safe_set_local_*``) over ``local_param_state`` /
``local_param_grad`` and theirs.

Each full accessor is a collective over the parameter's data-parallel group: call it on every
rank, after ``deepspeed.initialize``. As in DeepSpeed, a parameter no ZeRO engine holds gives
``None`` (and a set does nothing). The gradient is the reduced one ``step()`` applies (fp32,
averaged over the data-parallel group, times the fp16 loss scale, as DeepSpeed's): after the
accumulation boundary's backward and before ``step()``; at ZeRO 2-3 also between
micro-steps (the partial sum), at ZeRO 0-1 not (those accumulate locally: a RuntimeError
says so).

A local accessor reads or writes only this rank's piece, with no communication, so a rank may
call it alone. The piece is 1-D fp32 (a view of the live state where that already is fp32 on
the parameter's device, as DeepSpeed's); ``None`` for a frozen parameter (a set does
nothing). Unlike DeepSpeed's equal, padded ``ds_tensor`` pieces, ds-zero partitions buckets
of parameters, so a rank holds one contiguous range of the flattened parameter, whose size
differs between ranks and may be zero (``ds_zero.local_param_range`` says which); the ranks'
pieces concatenated in rank order are the flattened parameter, with no padding. At ZeRO
stages 0-2, and for a parameter no engine holds, they raise ``ds_zero.NotPartitionedError``
(an AssertionError, as DeepSpeed's), whose message points at the ``safe_get_full_*``
accessors. ``safe_set_local_fp32_param`` also updates this rank's compute-dtype shard (a
partitioned parameter gathers the new values at its next use; one kept whole on every rank
shows the other ranks' new pieces after the next step), where DeepSpeed's updates no
parameter copy before the step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ds_zero import (
    full_param_grad,
    full_param_state,
    local_param_grad,
    local_param_state,
    owner_of,
    set_full_param_grad,
    set_full_param_state,
    set_local_param_grad,
    set_local_param_state,
)

__all__ = [
    "safe_get_full_fp32_param",
    "safe_get_full_grad",
    "safe_get_full_optimizer_state",
    "safe_get_local_fp32_param",
    "safe_get_local_grad",
    "safe_get_local_optimizer_state",
    "safe_set_full_fp32_param",
    "safe_set_full_grad",
    "safe_set_full_optimizer_state",
    "safe_set_local_fp32_param",
    "safe_set_local_grad",
    "safe_set_local_optimizer_state",
    "safe_update_full_grad_vectorized",
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


def safe_update_full_grad_vectorized(
    param_list: list[nn.Parameter], update_func: Callable[[torch.Tensor, nn.Parameter], Any]
) -> None:
    """Replace the whole reduced gradient ``g`` of each parameter of ``param_list`` by
    ``update_func(g, param)`` before ``step()`` (a collective, like ``safe_set_full_grad``:
    call it on every rank with the same list). A parameter no ZeRO engine holds has its
    ``.grad`` updated in place, if it has one; frozen ones are skipped, as DeepSpeed's."""
    for p in param_list:
        if owner_of(p) is None:
            if p.grad is not None:
                p.grad.copy_(update_func(p.grad, p))
        elif p.requires_grad:
            set_full_param_grad(p, update_func(full_param_grad(p), p))


def safe_get_local_fp32_param(param: nn.Parameter) -> torch.Tensor | None:
    """This rank's piece of the ZeRO-3 parameter's fp32 master (1-D)."""
    return local_param_state(param, "master")


def safe_get_local_optimizer_state(
    param: nn.Parameter, optim_state_key: str
) -> torch.Tensor | None:
    """This rank's piece of the ZeRO-3 parameter's optimizer state ``optim_state_key``
    (``exp_avg``, ...), 1-D."""
    return local_param_state(param, optim_state_key)


def safe_set_local_fp32_param(param: nn.Parameter, value: torch.Tensor) -> None:
    """Set this rank's piece of the ZeRO-3 parameter's fp32 master to ``value`` (the piece's
    number of elements)."""
    set_local_param_state(param, value, "master")


def safe_set_local_optimizer_state(
    param: nn.Parameter, value: torch.Tensor, optim_state_key: str
) -> None:
    """Set this rank's piece of the ZeRO-3 parameter's optimizer state ``optim_state_key``."""
    set_local_param_state(param, value, optim_state_key)


def safe_get_local_grad(param: nn.Parameter) -> torch.Tensor | None:
    """This rank's piece of the ZeRO-3 parameter's reduced gradient (fp32, 1-D): after each
    backward (ZeRO-3 reduces every micro-step), before ``step()``."""
    return local_param_grad(param)


def safe_set_local_grad(param: nn.Parameter, value: torch.Tensor) -> None:
    """Replace this rank's piece of the ZeRO-3 parameter's reduced gradient by ``value``
    before ``step()`` applies it."""
    set_local_param_grad(param, value)
