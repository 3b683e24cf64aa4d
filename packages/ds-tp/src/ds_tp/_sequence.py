"""Megatron's sequence parallelism for the replicated parameters between parallel layers.

Under sequence parallelism a norm (or a row-parallel bias) sees only this rank's tokens, so its
gradient is a partial sum; a hook on the parameter adds the group's partial sums in backward,
before the gradient reaches ``.grad`` (and before ZeRO's reduction over data parallelism).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from ds_tp._mappings import group_size


def sequence_parallel_grad_hooks(module: nn.Module, group: Any) -> list[RemovableHandle]:
    """Sum over ``group`` the gradients of every replicated (not tensor-parallel) parameter of
    ``module``: call it on the modules that run on sequence slices (norms, sequence-parallel
    row layers' biases, or the whole block). Each parameter is hooked once; returns the
    handles."""
    handles: list[RemovableHandle] = []
    if group_size(group) == 1:
        return handles
    for p in module.parameters():
        if getattr(p, "tensor_model_parallel", False) or not p.requires_grad:
            continue
        if getattr(p, "ds_sequence_parallel_hooked", False):
            continue
        p.ds_sequence_parallel_hooked = True  # type: ignore[attr-defined]
        p.sequence_parallel = True  # type: ignore[attr-defined]

        def hook(g: torch.Tensor, group: Any = group) -> torch.Tensor:
            g = g.contiguous().clone()
            dist.all_reduce(g, group=group)
            return g

        handles.append(p.register_hook(hook))
    return handles
