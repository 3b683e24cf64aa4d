"""All-reduce and reduce-scatter of tensor lists through flat buckets.

Many small collectives are latency-bound; packing the tensors into flat buffers of at most
``bucket_size_bytes`` turns N launches into a few bandwidth-bound ones. Tensors are bucketed
by (dtype, device) in list order, so the bucket layout is a pure function of the list's shapes and
dtypes and therefore identical on every rank that passes the same list.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ds_comm._checks import check_group, check_reducible, check_tensor
from ds_comm._collectives import ReduceOp, _ThenWork, all_reduce, reduce_scatter_tensor
from ds_comm._logger import CommsLogger

DEFAULT_BUCKET_BYTES = 25 * 1024 * 1024  # torch DDP's default bucket cap


@dataclass(frozen=True)
class Bucket:
    """Indices (into the caller's list) of tensors that travel in one flat buffer."""

    indices: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


def plan_buckets(tensors: Sequence[torch.Tensor], bucket_size_bytes: int) -> list[Bucket]:
    """Group ``tensors`` by (dtype, device), in order, into buckets of at most
    ``bucket_size_bytes`` (a tensor larger than that gets a bucket of its own)."""
    if bucket_size_bytes <= 0:
        raise ValueError(f"bucket_size_bytes must be positive, got {bucket_size_bytes}")
    open_: dict[tuple[torch.dtype, torch.device], tuple[list[int], int]] = {}
    out: list[Bucket] = []
    for i, t in enumerate(tensors):
        key = (t.dtype, t.device)
        nbytes = t.numel() * t.element_size()
        idx, size = open_.get(key, ([], 0))
        if idx and size + nbytes > bucket_size_bytes:
            out.append(Bucket(tuple(idx), *key))
            idx, size = [], 0
        idx.append(i)
        open_[key] = (idx, size + nbytes)
    for key, (idx, _) in open_.items():
        if idx:
            out.append(Bucket(tuple(idx), *key))
    # Emit in order of first tensor so every rank issues the buckets in the same order.
    return sorted(out, key=lambda b: b.indices[0])


def _check_list(tensors: Sequence[torch.Tensor], op: str, group: Any) -> None:
    if group is not None:
        check_group(group, op)
    if len(tensors) == 0:
        raise ValueError(f"ds_comm.{op}: `tensors` is empty")
    for i, t in enumerate(tensors):
        check_tensor(t, op, f"tensors[{i}]")
        check_reducible(t, op, f"tensors[{i}]")


def all_reduce_coalesced(
    tensors: Sequence[torch.Tensor],
    op: Any = ReduceOp.SUM,
    group: Any = None,
    async_op: bool = False,
    *,
    bucket_size_bytes: int = DEFAULT_BUCKET_BYTES,
    log_name: str = "all_reduce_coalesced",
    logger: CommsLogger | None = None,
):
    """All-reduce every tensor of ``tensors`` in place, one collective per bucket."""
    _check_list(tensors, "all_reduce_coalesced", group)
    works: list[Any] = []
    copies: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
    for b in plan_buckets(tensors, bucket_size_bytes):
        members = [tensors[i] for i in b.indices]
        if len(members) == 1:  # no packing needed, reduce in place
            works.append(
                all_reduce(members[0], op, group, async_op, log_name=log_name, logger=logger)
            )
            continue
        flat = torch.cat([t.reshape(-1) for t in members])
        works.append(all_reduce(flat, op, group, async_op, log_name=log_name, logger=logger))
        copies.append((flat, members))

    def unpack() -> None:
        for flat, members in copies:
            for t, part in zip(members, flat.split([m.numel() for m in members])):
                t.copy_(part.view_as(t))

    if async_op:
        return _ThenWork(works, unpack)
    unpack()
    return None


def shard_numel(numel: int, world_size: int) -> int:
    """Elements of one rank's shard when a tensor of ``numel`` is split over ``world_size``
    ranks, the last shard zero-padded (ceil division)."""
    return -(-numel // world_size)


def reduce_scatter_coalesced(
    tensors: Sequence[torch.Tensor],
    op: Any = ReduceOp.SUM,
    group: Any = None,
    async_op: bool = False,
    *,
    bucket_size_bytes: int = DEFAULT_BUCKET_BYTES,
    log_name: str = "reduce_scatter_coalesced",
    logger: CommsLogger | None = None,
):
    """Reduce every tensor over the group and return this rank's shard of each.

    Tensor ``i`` is viewed flat and split into ``world_size`` shards of
    ``shard_numel(numel_i, world_size)`` elements (the last zero-padded); the result is a list of
    1-D tensors, the reduced shard ``rank`` of each input (padding included). With
    ``async_op=True`` returns ``(shards, handle)``; the shards are valid after ``handle.wait()``.
    The inputs are not modified.
    """
    _check_list(tensors, "reduce_scatter_coalesced", group)
    n = dist.get_world_size(group)
    shards: list[torch.Tensor | None] = [None] * len(tensors)
    works: list[Any] = []
    outs: list[tuple[torch.Tensor, tuple[int, ...]]] = []
    for b in plan_buckets(tensors, bucket_size_bytes):
        lens = [shard_numel(tensors[i].numel(), n) for i in b.indices]
        per_rank = sum(lens)
        # Layout: [rank0: shard0 of t_a | shard0 of t_b ...][rank1: ...] so that the bucket's
        # reduce-scatter hands rank r exactly its shard of every tensor, contiguously.
        flat_in = torch.zeros(n, per_rank, dtype=b.dtype, device=b.device)
        offset = 0
        for i, ln in zip(b.indices, lens):
            src = tensors[i].reshape(-1)
            padded = (
                src
                if src.numel() == n * ln
                else torch.nn.functional.pad(src, (0, n * ln - src.numel()))
            )
            flat_in[:, offset : offset + ln].copy_(padded.view(n, ln))
            offset += ln
        flat_out = torch.empty(per_rank, dtype=b.dtype, device=b.device)
        works.append(
            reduce_scatter_tensor(
                flat_out, flat_in.view(-1), op, group, async_op, log_name=log_name, logger=logger
            )
        )
        outs.append((flat_out, b.indices))
        for i, part in zip(b.indices, flat_out.split(lens)):
            shards[i] = part  # views: filled once the bucket's op completes

    result = [s for s in shards if s is not None]
    if async_op:
        return result, _ThenWork(works, lambda: None)
    return result
