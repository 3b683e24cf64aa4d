"""Megatron-LM's communication regions as autograd functions.

Each pairs a forward collective with its adjoint in backward, so that a tensor-parallel model
computes the same loss and gradients as the unsharded one:

============================  =========================  ===============================
function                      forward                    backward
============================  =========================  ===============================
copy_to_tp_region             identity                   all-reduce (sum)
reduce_from_tp_region         all-reduce (sum)           identity
scatter_to_tp_region          keep this rank's slice     all-gather
gather_from_tp_region         all-gather                 keep this rank's slice
scatter_to_sequence_region    keep this rank's slice     all-gather          (seq_dim)
gather_from_sequence_region   all-gather                 reduce-scatter      (seq_dim)
reduce_scatter_to_sequence    reduce-scatter             all-gather          (seq_dim)
============================  =========================  ===============================

``group=None`` means no tensor parallelism: every function is the identity.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def group_size(group: Any) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Any) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group: Any) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def _split(
    x: torch.Tensor, dim: int, group: Any, sizes: tuple[int, ...] | None = None
) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    n = x.shape[dim]
    if n % world:
        raise ValueError(
            f"dimension {dim} of size {n} does not divide the tensor-parallel size {world}"
        )
    return x.narrow(dim, group_rank(group) * (n // world), n // world).contiguous()


def _gather(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    n = x.shape[dim]
    if n % world:
        raise ValueError(
            f"sequence dimension {dim} of size {n} does not divide the tensor-parallel size "
            f"{world}; pad the sequence to a multiple of it"
        )
    inputs = [c.contiguous() for c in x.chunk(world, dim=dim)]
    out = torch.empty_like(inputs[0])
    dist.reduce_scatter(out, inputs, group=group)
    return out


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_reduce(g, ctx.group), None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return g, None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _gather(g, ctx.dim, ctx.group), None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        return _gather(x, dim, group)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _split(g, ctx.dim, ctx.group), None, None


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        return _gather(x, dim, group)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        # every rank's consumer (a column-parallel matmul) saw the whole sequence; the
        # gradient of this rank's tokens is the sum over ranks of their partial gradients
        return _reduce_scatter(g, ctx.dim, ctx.group), None, None


class _ReduceScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _gather(g, ctx.dim, ctx.group), None, None


def copy_to_tp_region(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Input of a column-parallel layer: replicated forward, gradients summed over the group."""
    return x if group_size(group) == 1 else _Copy.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Output of a row-parallel layer: partial sums added over the group."""
    return x if group_size(group) == 1 else _Reduce.apply(x, group)


def scatter_to_tp_region(x: torch.Tensor, group: Any, dim: int = -1) -> torch.Tensor:
    """A replicated tensor's slice along ``dim`` (the input of a row-parallel layer)."""
    return x if group_size(group) == 1 else _Scatter.apply(x, group, dim)


def gather_from_tp_region(x: torch.Tensor, group: Any, dim: int = -1) -> torch.Tensor:
    """Concatenate the group's slices along ``dim`` (a column-parallel layer's full output)."""
    return x if group_size(group) == 1 else _Gather.apply(x, group, dim)


def scatter_to_sequence_region(x: torch.Tensor, group: Any, seq_dim: int = 1) -> torch.Tensor:
    """Enter sequence parallelism: this rank's contiguous slice of the sequence."""
    return x if group_size(group) == 1 else _Scatter.apply(x, group, seq_dim)


def gather_from_sequence_region(x: torch.Tensor, group: Any, seq_dim: int = 1) -> torch.Tensor:
    """All-gather sequence slices before a column-parallel layer (reduce-scatter in backward)."""
    return x if group_size(group) == 1 else _GatherSeq.apply(x, group, seq_dim)


def reduce_scatter_to_sequence_region(
    x: torch.Tensor, group: Any, seq_dim: int = 1
) -> torch.Tensor:
    """Sum a row-parallel layer's partial outputs and keep this rank's sequence slice."""
    return x if group_size(group) == 1 else _ReduceScatterSeq.apply(x, group, seq_dim)
