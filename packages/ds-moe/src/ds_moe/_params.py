"""The contract with ZeRO and optimizers: which parameters are experts, reduced over what.

Every parameter of an MoE layer's experts carries:

- ``ds_expert = True``
- ``ds_expert_group_name = "ep_size_<n>"``
- ``ds_expert_dp_group``: the ``torch.distributed`` ProcessGroup over which its gradient is
  reduced and its optimizer state partitioned (None without torch.distributed)
- ``allreduce = False`` and ``group_name`` (DeepSpeed's spelling of the same facts)

so that ds-zero (or any other reducer) needs no import of ds_moe. The reducer averages each
gradient over the group it reduces it over; the layer has already scaled expert gradients so
that this yields the gradient of the mean loss (see ``_dispatch._run_experts``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ds_moe._groups import ExpertGroups


def mark_expert_params(module: nn.Module, groups: ExpertGroups) -> None:
    for p in module.parameters():
        p.ds_expert = True
        p.ds_expert_group_name = groups.name
        p.ds_expert_dp_group = groups.expert_dp_group
        p.allreduce = False
        p.group_name = groups.name


_MARKS = ("ds_expert", "ds_expert_group_name", "ds_expert_dp_group", "allreduce", "group_name")


def deepcopy_keeping_marks(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """``copy.deepcopy`` of an experts module whose copy's parameters keep the marks.

    ``nn.Parameter.__deepcopy__`` drops Python attributes, so a deep-copied model (an EMA copy,
    a reference model) would otherwise look dense to ZeRO. The marks are copied by reference:
    the process group is a handle to process-wide communicators, not data.
    """
    cls = type(module)
    new = cls.__new__(cls)
    memo[id(module)] = new
    for key, value in module.__dict__.items():
        new.__dict__[key] = copy.deepcopy(value, memo)
    for p, q in zip(module.parameters(), new.parameters()):
        for mark in _MARKS:
            if hasattr(p, mark):
                setattr(q, mark, getattr(p, mark))
    return new


def is_moe_param(param: torch.Tensor) -> bool:
    """True for a parameter of an MoE layer's experts (gate and residual MLP are dense): marked
    ``ds_expert`` by ds-moe, or ``allreduce = False`` as DeepSpeed's ``Experts`` marks it."""
    if getattr(param, "ds_expert", False):
        return True
    return hasattr(param, "allreduce") and not param.allreduce


def _group_name(param: torch.Tensor) -> str:
    name = getattr(param, "ds_expert_group_name", None)
    return name if name is not None else param.group_name


def split_params_into_shared_and_expert_params(
    params: Iterable[torch.Tensor],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(shared, expert)`` parameters of ``params``, each in the given order."""
    shared: list[torch.Tensor] = []
    expert: list[torch.Tensor] = []
    for p in params:
        (expert if is_moe_param(p) else shared).append(p)
    return shared, expert


def split_params_grads_into_shared_and_expert_params(
    group: Iterable[torch.Tensor],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(shared_grads, expert_grads)``: the gradients (cast to their parameter's dtype) of the
    parameters in ``group`` that have one, split as for grad-norm clipping per kind."""
    shared: list[torch.Tensor] = []
    expert: list[torch.Tensor] = []
    for p in group:
        if p.grad is not None:
            (expert if is_moe_param(p) else shared).append(p.grad.to(p.dtype))
    return shared, expert


def is_moe_param_group(param_group: dict[str, Any]) -> bool:
    """True for an optimizer param group made of expert parameters (``"moe": True``)."""
    return bool(param_group.get("moe", False))


#: DeepSpeed's default cap on one expert param group's elements (so a group's flat fp32
#: buffer stays addressable)
MAX_MOE_GROUP_SIZE = 178956971


def split_params_into_different_moe_groups_for_optimizer(
    param_groups: dict[str, Any] | Iterable[dict[str, Any]] | Iterable[nn.Parameter],
    max_group_size: int | float | None = MAX_MOE_GROUP_SIZE,
) -> list[dict[str, Any]]:
    """Split optimizer param groups so that expert parameters sit in groups of their own.

    Each input group keeps its dense parameters (and options); its expert parameters move to
    one new group per expert group name, copying the options and adding ``"moe": True`` and
    ``"name": "ep_size_<n>"`` (DeepSpeed's keys), so a ZeRO optimizer can reduce and partition
    each such group over ``ds_expert_dp_group``. A plain iterable of parameters is treated as
    one group. Groups left with no parameters are dropped. As DeepSpeed's, an expert group is cut
    into several of at most ``max_group_size`` elements each (``ds_numel`` for a ZeRO-3
    parameter); ``None`` keeps one group per expert group name.
    """
    if max_group_size is not None and not max_group_size > 0:
        raise ValueError(f"max_group_size={max_group_size!r} must be > 0 (or None: no limit)")
    if isinstance(param_groups, dict):
        groups = [param_groups]
    else:
        items = list(param_groups)
        if items and all(isinstance(p, torch.Tensor) for p in items):
            groups = [{"params": items}]
        elif all(isinstance(g, dict) for g in items):
            groups = items
        else:
            raise TypeError(
                "split_params_into_different_moe_groups_for_optimizer takes a param group dict, "
                "a list of them, or an iterable of parameters (not a mix)"
            )
    out: list[dict[str, Any]] = []
    for g in groups:
        if "params" not in g:
            raise KeyError("a param group has no 'params' key; pass {'params': [...], ...}")
        params = g["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        options = {key: v for key, v in g.items() if key != "params"}
        dense = [p for p in params if not is_moe_param(p)]
        by_name: dict[str, list[torch.Tensor]] = {}
        for p in params:
            if is_moe_param(p):
                by_name.setdefault(_group_name(p), []).append(p)
        if dense:
            out.append({**options, "params": dense})
        for name, ps in by_name.items():
            for chunk in _chunks(ps, max_group_size):
                out.append({**options, "params": chunk, "moe": True, "name": name})
    return out


def _chunks(params: list[torch.Tensor], max_size: int | float | None) -> list[list[torch.Tensor]]:
    """Consecutive runs of ``params`` of at most ``max_size`` elements (DeepSpeed's cut: a
    parameter larger than the limit gets a group of its own)."""
    if max_size is None:
        return [params]
    out: list[list[torch.Tensor]] = []
    cur: list[torch.Tensor] = []
    size = 0
    for p in params:
        n = getattr(p, "ds_numel", None) or p.numel()
        if cur and size + n > max_size:
            out.append(cur)
            cur, size = [], 0
        cur.append(p)
        size += n
    if cur:
        out.append(cur)
    return out


def configure_moe_param_groups(model_parameters: list[Any]) -> list[dict[str, Any]]:
    """DeepSpeed's optimizer-input helper: a list of parameters becomes one dense group (named
    ``"dense-params"``) plus the expert groups; a list of param groups is split the same way
    unless one of them already has a ``"moe"`` key (then it is returned as is)."""
    if not isinstance(model_parameters, list):
        raise TypeError(
            f"configure_moe_param_groups takes a list, got {type(model_parameters).__name__}; "
            "pass list(model.parameters()) or a list of param group dicts"
        )
    for p in model_parameters:
        if not isinstance(p, (torch.Tensor, dict)):
            raise TypeError(
                "param argument that would be given to the optimizer should be an iterable of "
                f"Tensors or dicts, but got {type(p)}"
            )
    if not model_parameters:
        raise ValueError("configure_moe_param_groups: the parameter list is empty")
    first = model_parameters[0]
    if isinstance(first, torch.Tensor):
        return split_params_into_different_moe_groups_for_optimizer(
            {"params": model_parameters, "name": "dense-params"}
        )
    if any("moe" in g for g in model_parameters):
        return model_parameters
    return split_params_into_different_moe_groups_for_optimizer(model_parameters)


def has_moe_layers(m: nn.Module) -> tuple[bool, int]:
    """``(True, num_experts of the first MoE layer)`` if ``model`` holds a ds-moe ``MoE``,
    else ``(False, 0)`` (DeepSpeed's engine check)."""
    from ds_moe._layer import MoE

    for module in m.modules():
        if isinstance(module, MoE):
            return True, module.num_experts
    return False, 0
