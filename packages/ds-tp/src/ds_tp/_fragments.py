"""Checkpoint fragments of tensor-parallel shards as pieces of the full tensors.

A checkpoint fragment (name, global shape, dtype, offset, numel, 1-D tensor) addresses a
contiguous range of a flattened tensor. A shard's fragment (what ZeRO hands over: a range of
the flattened *local* tensor) becomes one fragment per run that is contiguous in the full
tensor (one run for a dim-0 shard, one per row or sub-parameter otherwise), each a view of
the original's data, so saving writes and loading fills the same memory. A checkpoint written
this way holds only full tensors, and loads at any tensor-parallel size.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ds_tp._shard import TPShard


@dataclass
class ShardFragment:
    """A fragment of a full tensor (ds_ckpt's ``FragmentLike`` attributes)."""

    name: str
    global_shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    numel: int
    tensor: torch.Tensor


def _param_name(fragment_name: str) -> str:
    # ZeRO names optimizer state "optimizer.<state key>.<parameter name>"
    if fragment_name.startswith("optimizer."):
        parts = fragment_name.split(".", 2)
        return parts[2] if len(parts) == 3 else fragment_name
    return fragment_name


def full_tensor_fragments(
    fragments: Iterable[Any],
    shards: Mapping[str, TPShard],
    *,
    keep_replicated: bool = True,
) -> list[Any]:
    """Rewrite the fragments of sharded tensors (``shards``: parameter name -> layout) as
    fragments of the full tensors; others pass through, or are dropped when
    ``keep_replicated`` is False (saving: one tensor-parallel rank writes replicated state)."""
    out: list[Any] = []
    for f in fragments:
        shard = shards.get(_param_name(f.name))
        if shard is None or tuple(f.global_shape) != shard.local_shape:
            if keep_replicated:
                out.append(f)
            continue
        for g, lo, n in shard.global_ranges(f.offset, f.numel):
            start = lo - f.offset
            out.append(
                ShardFragment(f.name, shard.full_shape, f.dtype, g, n, f.tensor[start : start + n])
            )
    return out


def shard_layouts(module: torch.nn.Module) -> dict[str, TPShard]:
    """Parameter name -> layout of every tensor-parallel parameter of ``module``."""
    return {
        name: p.ds_tp_shard
        for name, p in module.named_parameters()
        if getattr(p, "ds_tp_shard", None) is not None
    }
