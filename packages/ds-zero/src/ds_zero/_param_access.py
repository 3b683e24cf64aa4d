"""One parameter's ZeRO state, whole: DeepSpeed's debugging accessors
(``safe_get_full_fp32_param``, ``safe_get_full_optimizer_state``, ``safe_get_full_grad`` and
their setters; ds-all serves them under ``deepspeed.utils``).

Each is a collective over the parameter's data-parallel group (an expert's: its expert
data-parallel group): every rank holding the parameter calls it. Reading puts this rank's
pieces of the fp32 state (``Zero.state_fragments``: each piece on exactly one rank) into a
zero tensor of the full size and sums it over the group; writing copies each rank's pieces
out of the full value (the same on every rank) through ``Zero.load_state_fragments``, which
then refreshes the compute-dtype parameters from the fp32 master.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from ds_zero._dist import group_size
from ds_zero._param_meta import full_numel, full_shape

if TYPE_CHECKING:
    from ds_zero._zero import Zero

__all__ = [
    "full_param_grad",
    "full_param_state",
    "owner_of",
    "register_owner",
    "set_full_param_grad",
    "set_full_param_state",
]

_OWNER = "_ds_zero_owner"


def register_owner(zero: Zero, params: list[nn.Parameter]) -> None:
    """Mark ``params`` as held by ``zero`` (a weak reference: the mark never keeps it alive)."""
    ref = weakref.ref(zero)
    for p in params:
        setattr(p, _OWNER, ref)


def owner_of(p: nn.Parameter) -> Zero | None:
    """The ZeRO instance holding ``p``, None if none (any more)."""
    ref = getattr(p, _OWNER, None)
    return ref() if ref is not None else None


def _owner_and_name(p: nn.Parameter, what: str) -> tuple[Zero, str]:
    zero = owner_of(p)
    if zero is None or id(p) not in zero.names:
        raise ValueError(
            f"{what}: this parameter is not held by a ZeRO engine; pass a parameter of the "
            "model that deepspeed.initialize (or ds_zero.wrap) returned"
        )
    return zero, zero.names[id(p)]


def _fragment_name(name: str, key: str) -> str:
    return name if key == "master" else f"optimizer.{key}.{name}"


def _group(zero: Zero, p: nn.Parameter):  # noqa: ANN202 - a ProcessGroup or None
    if getattr(p, "ds_expert", False):
        return getattr(p, "ds_expert_dp_group", None)
    return zero.dp_group


def full_param_state(p: nn.Parameter, key: str = "master") -> torch.Tensor:
    """``p``'s whole fp32 master (``key="master"``) or element-wise optimizer state ``key``
    (``exp_avg``, ``exp_avg_sq``, ...), in ``p``'s full shape on ``p``'s device; on every
    rank of its group."""
    zero, name = _owner_and_name(p, "full_param_state")
    _check_key(zero, key, "full_param_state")
    return _assemble(zero, p, zero.state_fragments(), _fragment_name(name, key))


def _assemble(zero: Zero, p: nn.Parameter, fragments: list, target: str) -> torch.Tensor:
    """The whole fp32 tensor ``target`` from this rank's disjoint ``fragments`` of it, summed
    over ``p``'s group (each piece is on exactly one rank), in ``p``'s full shape."""
    out = torch.zeros(full_numel(p), dtype=torch.float32, device=p.device)
    for f in fragments:
        if f.name == target:
            out[f.offset : f.offset + f.numel] = f.tensor.to(device=p.device, dtype=torch.float32)
    group = _group(zero, p)
    if group_size(group) > 1:
        dist.all_reduce(out, group=group)  # the pieces are disjoint: the sum is the whole
    return out.view(full_shape(p))


def _check_size(p: nn.Parameter, name: str, value: torch.Tensor, what: str) -> None:
    if value.numel() != full_numel(p):
        raise ValueError(
            f"{what}: {name!r} has {full_numel(p)} elements {tuple(full_shape(p))}, the value "
            f"{value.numel()} {tuple(value.shape)}"
        )


def _copy_into(fragments: list, value: torch.Tensor, target: str) -> None:
    """Copy the pieces of ``value`` (flattened) into the ``fragments`` of ``target``."""
    flat = value.detach().reshape(-1)
    for f in fragments:
        if f.name == target:
            piece = flat[f.offset : f.offset + f.numel]
            f.tensor.copy_(piece.to(device=f.tensor.device, dtype=f.tensor.dtype))


def _check_key(zero: Zero, key: str, what: str) -> None:
    keys = {"master"} | zero.elementwise_state_keys()
    if key not in keys:
        raise KeyError(
            f"{what}: no element-wise state {key!r}; this optimizer keeps {sorted(keys)} "
            "(scalars such as 'step' are not per-parameter tensors)"
        )


def set_full_param_state(p: nn.Parameter, value: torch.Tensor, key: str = "master") -> None:
    """Write ``value`` (``p``'s full shape; the same on every rank of its group) into ``p``'s
    fp32 master or optimizer state ``key``; the parameter follows the new master."""
    zero, name = _owner_and_name(p, "set_full_param_state")
    _check_size(p, name, value, "set_full_param_state")
    _check_key(zero, key, "set_full_param_state")
    target = _fragment_name(name, key)
    zero.load_state_fragments(lambda dests: _copy_into(dests, value, target))


def full_param_grad(p: nn.Parameter) -> torch.Tensor:
    """``p``'s whole reduced gradient (fp32, ``p``'s full shape, on every rank of its group):
    what ``step()`` will apply, averaged over the data-parallel group and, with fp16, times
    the loss scale (``Zero.grad_fragments`` says when it is defined)."""
    zero, name = _owner_and_name(p, "full_param_grad")
    return _assemble(zero, p, zero.grad_fragments(), name)


def set_full_param_grad(p: nn.Parameter, value: torch.Tensor) -> None:
    """Replace ``p``'s reduced gradient by ``value`` (full shape, the same on every rank of
    its group) before ``step()`` applies it."""
    zero, name = _owner_and_name(p, "set_full_param_grad")
    _check_size(p, name, value, "set_full_param_grad")
    _copy_into(zero.grad_fragments(for_write=True), value, name)
