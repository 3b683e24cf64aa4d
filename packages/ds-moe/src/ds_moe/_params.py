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
    """True for a parameter of an MoE layer's experts (gate and residual MLP are dense)."""
    return bool(getattr(param, "ds_expert", False))


def split_params_into_different_moe_groups_for_optimizer(
    param_groups: dict[str, Any] | Iterable[dict[str, Any]] | Iterable[nn.Parameter],
) -> list[dict[str, Any]]:
    """Split optimizer param groups so that expert parameters sit in groups of their own.

    Each input group keeps its dense parameters (and options); its expert parameters move to
    one new group per expert group name, copying the options and adding ``"moe": True`` and
    ``"name": "ep_size_<n>"`` (DeepSpeed's keys), so a ZeRO optimizer can reduce and partition
    each such group over ``ds_expert_dp_group``. A plain iterable of parameters is treated as
    one group. Groups left with no parameters are dropped.
    """
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
                by_name.setdefault(p.ds_expert_group_name, []).append(p)
        if dense:
            out.append({**options, "params": dense})
        for name, ps in by_name.items():
            out.append({**options, "params": ps, "moe": True, "name": name})
    return out
