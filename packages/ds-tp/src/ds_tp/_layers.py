"""Column- and row-parallel linear layers (Megatron-LM's split of a Linear over ranks).

A column-parallel layer holds rows ``out/tp`` of the weight (output features split): its input
is replicated (gradient summed over the group in backward), its output is this rank's slice of
the features, or the whole output with ``gather_output``. A row-parallel layer holds columns
``in/tp`` (input features split): it multiplies this rank's slice of the input and sums the
partial products over the group; its bias is replicated and added once, after the sum.

The pair column -> elementwise -> row (an MLP, attention's projections) needs one all-reduce
forward and one backward. With ``sequence_parallel`` the activations between such pairs are
split along the sequence instead of replicated: the column layer all-gathers its input along the
sequence and the row layer reduce-scatters its output (the same bytes as one all-reduce), so the
norms and dropouts between pairs hold 1/tp of the activations.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ds_tp._mappings import (
    copy_to_tp_region,
    gather_from_sequence_region,
    gather_from_tp_region,
    group_rank,
    group_size,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_region,
    scatter_to_tp_region,
)
from ds_tp._shard import TPShard, check_divisible


def mark_tp_param(param: nn.Parameter, shard: TPShard, group: Any = None) -> None:
    """Tag a sharded parameter: Megatron's attributes (``tensor_model_parallel``,
    ``partition_dim``, ``partition_stride``) that clipping and checkpoint code read, and
    ``ds_tp_shard`` with the full-tensor layout, ``ds_tp_group`` the group it is split over."""
    param.tensor_model_parallel = True  # type: ignore[attr-defined]
    param.partition_dim = shard.dim  # type: ignore[attr-defined]
    param.partition_stride = len(shard.sub_sizes)  # type: ignore[attr-defined]
    param.ds_tp_shard = shard  # type: ignore[attr-defined]
    param.ds_tp_group = group  # type: ignore[attr-defined]


def _sub_sizes(
    name: str, size: int, sub_sizes: tuple[int, ...] | None, world: int
) -> tuple[int, ...]:
    subs = tuple(sub_sizes) if sub_sizes else (size,)
    if sum(subs) != size:
        raise ValueError(f"{name}: fused sub-parameter sizes {subs} do not add up to {size}")
    for s in subs:
        check_divisible(name, "fused sub-parameter size" if len(subs) > 1 else "size", s, world)
    return subs


def _shard_param(
    name: str, full: torch.Tensor, dim: int, subs: tuple[int, ...], group: Any
) -> nn.Parameter:
    world = group_size(group)
    shard = TPShard(tuple(full.shape), dim, subs, group_rank(group), world)
    if isinstance(full, nn.Parameter):
        # the same Parameter object, resized to the slice (as DeepSpeed's AutoTP does): an
        # optimizer or a ZeRO wrapper built over the model before sharding stays valid
        p = full
        p.data = shard.shard(full.detach())
    else:
        p = nn.Parameter(shard.shard(full.detach()), requires_grad=full.requires_grad)
    if world > 1:
        mark_tp_param(p, shard, group)
    return p


def _reorder_gathered(y: torch.Tensor, subs: tuple[int, ...], world: int) -> torch.Tensor:
    """[rank0: a0 b0, rank1: a1 b1] -> [a0 a1, b0 b1]: the fused layout of the full output."""
    if len(subs) == 1:
        return y
    local = [s // world for s in subs]
    chunks = [c.split(local, dim=-1) for c in y.chunk(world, dim=-1)]
    return torch.cat([chunks[r][k] for k in range(len(subs)) for r in range(world)], dim=-1)


class ColumnParallelLinear(nn.Module):
    """``y = x W^T + b`` with ``W``'s output features split over ``group``.

    ``gather_output``: return the full output on every rank (otherwise this rank's features).
    ``sequence_parallel``: the input is this rank's slice of the sequence (``seq_dim``) and is
    all-gathered first. ``sub_sizes``: sizes of fused sub-parameters along the output features,
    each split on its own (``(I, I)`` for a ``gate_up_proj``). ``group=None``: no parallelism.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        group: Any = None,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        seq_dim: int = 1,
        sub_sizes: tuple[int, ...] | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
        name: str = "ColumnParallelLinear",
    ) -> None:
        super().__init__()
        # the full layer is initialised as nn.Linear would (same seed on every rank gives the
        # same full weight), then this rank keeps its slice
        full = nn.Linear(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_from(full, group, gather_output, sequence_parallel, seq_dim, sub_sizes, name)

    def _init_from(
        self, full: nn.Linear, group: Any, gather_output: bool, sequence_parallel: bool,
        seq_dim: int, sub_sizes: tuple[int, ...] | None, name: str,
    ) -> None:  # fmt: skip
        self.group = group
        self.tp_world_size: int = group_size(group)
        self.tp_rank: int = group_rank(group)
        self.in_features: int = full.in_features
        self.out_features: int = full.out_features
        self.gather_output: bool = gather_output
        self.sequence_parallel: bool = sequence_parallel
        self.seq_dim: int = seq_dim
        self.name: str = name
        self.sub_sizes: tuple[int, ...] = _sub_sizes(
            f"{name} (out_features)", full.out_features, sub_sizes, self.tp_world_size
        )
        self.weight = _shard_param(name, full.weight, 0, self.sub_sizes, group)
        self.bias = (
            None if full.bias is None else _shard_param(name, full.bias, 0, self.sub_sizes, group)
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        group: Any,
        *,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        seq_dim: int = 1,
        sub_sizes: tuple[int, ...] | None = None,
        name: str = "ColumnParallelLinear",
    ) -> ColumnParallelLinear:
        """Shard an existing ``nn.Linear``: its Parameters are reused, resized to this rank's
        slice (an optimizer built over them stays valid); drop the Linear afterwards."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._init_from(linear, group, gather_output, sequence_parallel, seq_dim, sub_sizes, name)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = gather_from_sequence_region(x, self.group, self.seq_dim)
        else:
            x = copy_to_tp_region(x, self.group)
        y = F.linear(x, self.weight, self.bias)
        if self.gather_output:
            y = _reorder_gathered(
                gather_from_tp_region(y, self.group), self.sub_sizes, self.tp_world_size
            )
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features} "
            f"(local {self.weight.shape[0]}), tp={self.tp_world_size}, "
            f"gather_output={self.gather_output}, sequence_parallel={self.sequence_parallel}"
        )


class RowParallelLinear(nn.Module):
    """``y = x W^T + b`` with ``W``'s input features split over ``group``.

    ``input_is_parallel``: ``x`` is already this rank's slice of the features (the output of a
    column-parallel layer); otherwise the full ``x`` is sliced here. ``sequence_parallel``: the
    output is reduce-scattered along ``seq_dim`` instead of all-reduced (the bias is then
    replicated but sees only this rank's tokens: :func:`ds_tp.sequence_parallel_grad_hooks`
    sums its gradient).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        group: Any = None,
        input_is_parallel: bool = False,
        sequence_parallel: bool = False,
        seq_dim: int = 1,
        device: Any = None,
        dtype: torch.dtype | None = None,
        name: str = "RowParallelLinear",
    ) -> None:
        super().__init__()
        full = nn.Linear(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_from(full, group, input_is_parallel, sequence_parallel, seq_dim, name)

    def _init_from(
        self, full: nn.Linear, group: Any, input_is_parallel: bool, sequence_parallel: bool,
        seq_dim: int, name: str,
    ) -> None:  # fmt: skip
        self.group = group
        self.tp_world_size: int = group_size(group)
        self.tp_rank: int = group_rank(group)
        self.in_features: int = full.in_features
        self.out_features: int = full.out_features
        self.input_is_parallel: bool = input_is_parallel
        self.sequence_parallel: bool = sequence_parallel
        self.seq_dim: int = seq_dim
        self.name: str = name
        subs = _sub_sizes(f"{name} (in_features)", full.in_features, None, self.tp_world_size)
        self.weight = _shard_param(name, full.weight, 1, subs, group)
        # replicated: added once after the reduction
        self.bias = full.bias
        if self.bias is not None and sequence_parallel:
            self.bias.sequence_parallel = True  # type: ignore[attr-defined]

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        group: Any,
        *,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
        seq_dim: int = 1,
        name: str = "RowParallelLinear",
    ) -> RowParallelLinear:
        """Shard an existing ``nn.Linear``: its Parameters are reused, the weight resized to
        this rank's slice. As DeepSpeed's AutoTP, the input defaults to the previous column
        layer's slice."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._init_from(linear, group, input_is_parallel, sequence_parallel, seq_dim, name)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x, self.group, -1)
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_region(y, self.group, self.seq_dim)
        else:
            y = reduce_from_tp_region(y, self.group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features} (local {self.weight.shape[1]}), "
            f"out_features={self.out_features}, tp={self.tp_world_size}, "
            f"input_is_parallel={self.input_is_parallel}, sequence_parallel={self.sequence_parallel}"
        )
