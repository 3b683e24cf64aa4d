"""``deepspeed.utils.tensor_fragment``: DeepSpeed's accessors of one parameter's whole fp32
state under ZeRO (``safe_get_full_fp32_param``, ``safe_get_full_optimizer_state``,
``safe_set_full_fp32_param``, ``safe_set_full_optimizer_state``), over ds-zero's
``full_param_state`` / ``set_full_param_state``.

Each is a collective over the parameter's data-parallel group: call it on every rank, after
``deepspeed.initialize``. As in DeepSpeed, a parameter no ZeRO engine holds gives ``None``
(and a set does nothing). The gradient accessors (``safe_get_full_grad``, ...) are not
provided: ds-zero reduces gradients into its partitions inside ``step()``'s boundary, with no
stable place to read them between backward and step.
"""

from __future__ import annotations

import torch
from torch import nn

from ds_zero import full_param_state, owner_of, set_full_param_state

__all__ = [
    "safe_get_full_fp32_param",
    "safe_get_full_optimizer_state",
    "safe_set_full_fp32_param",
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
