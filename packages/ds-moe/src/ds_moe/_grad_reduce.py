"""Expert-aware data-parallel gradient averaging (what DDP would do, knowing about experts).

The reference semantics ds-zero follows for MoE, with the loss the mean over the ``W`` ranks'
local losses: every gradient is averaged over the group it is reduced over:

- a dense gradient: all-reduce (sum) over the data-parallel group, divided by its size ``W``;
- an expert gradient: all-reduce (sum) over its ``ds_expert_dp_group``, divided by that
  group's size ``W / ep_size``. The MoE layer has already made the local expert gradient a
  per-rank mean over its expert-parallel group (see ``_dispatch._run_experts``), so the result
  is the gradient of the mean loss, the same scale as the dense gradients. (DeepSpeed divides
  the same way but without that correction, so its expert gradients are ep_size times the
  dense ones' scale, which changes gradient clipping.)

Parameters without a gradient on this rank take part with zeros, so every rank issues the same
collectives in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed import ProcessGroup

import ds_comm


def _reduce(params: list[torch.Tensor], group: ProcessGroup | None, log_name: str) -> None:
    divisor = dist.get_world_size(group)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for dtype in sorted(by_dtype, key=str):  # same order on every rank
        ps = by_dtype[dtype]
        flat = _flatten_dense_tensors([p.grad for p in ps])
        ds_comm.all_reduce(flat, group=group, log_name=log_name)
        flat.div_(divisor)
        for p, g in zip(ps, _unflatten_dense_tensors(flat, [p.grad for p in ps])):
            p.grad.copy_(g)


def reduce_gradients(
    parameters: Iterable[torch.Tensor], dp_group: ProcessGroup | None = None
) -> None:
    """Average the gradients of ``parameters`` (a model's, in the same order on every rank).

    ``dp_group`` is the data-parallel group of the dense parameters (default: the world).
    Expert parameters are recognised by ``ds_expert`` and averaged over their
    ``ds_expert_dp_group``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("reduce_gradients needs torch.distributed to be initialised")
    params = [p for p in parameters if p.requires_grad]
    dense = [p for p in params if not getattr(p, "ds_expert", False)]
    experts: dict[str, list[torch.Tensor]] = {}
    groups: dict[str, ProcessGroup | None] = {}
    for p in params:
        if getattr(p, "ds_expert", False):
            name = p.ds_expert_group_name
            experts.setdefault(name, []).append(p)
            groups[name] = p.ds_expert_dp_group
    if dense:
        _reduce(dense, dp_group, "grad_reduce_dense")
    for name in sorted(experts):
        _reduce(experts[name], groups[name], f"grad_reduce_{name}")
