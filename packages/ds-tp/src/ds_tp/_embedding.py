"""Vocabulary-parallel embedding: each rank holds rows ``[r * V/tp, (r + 1) * V/tp)``.

A token outside this rank's range looks up a zero vector; summing over the group (an
all-reduce, or a reduce-scatter along the sequence with ``sequence_parallel``) gives every rank
the embedding of every token.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ds_tp._layers import _shard_param
from ds_tp._mappings import (
    group_rank,
    group_size,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_region,
)
from ds_tp._shard import check_divisible


class VocabParallelEmbedding(nn.Module):
    """``nn.Embedding(num_embeddings, embedding_dim)`` with the vocabulary split over ``group``."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        *,
        group: Any = None,
        sequence_parallel: bool = False,
        seq_dim: int = 1,
        device: Any = None,
        dtype: torch.dtype | None = None,
        name: str = "VocabParallelEmbedding",
    ) -> None:
        super().__init__()
        full = nn.Embedding(num_embeddings, embedding_dim, padding_idx, device=device, dtype=dtype)
        self._init_from(full, group, sequence_parallel, seq_dim, name)

    def _init_from(
        self, full: nn.Embedding, group: Any, sequence_parallel: bool, seq_dim: int, name: str
    ) -> None:
        world = group_size(group)
        check_divisible(name, "vocabulary size (num_embeddings)", full.num_embeddings, world)
        self.group = group
        self.tp_world_size: int = world
        self.tp_rank: int = group_rank(group)
        self.num_embeddings: int = full.num_embeddings
        self.embedding_dim: int = full.embedding_dim
        self.padding_idx: int | None = full.padding_idx
        self.sequence_parallel: bool = sequence_parallel
        self.seq_dim: int = seq_dim
        per = full.num_embeddings // world
        self.vocab_start: int = self.tp_rank * per
        self.vocab_end: int = self.vocab_start + per
        self.weight = _shard_param(name, full.weight, 0, (full.num_embeddings,), group)

    @classmethod
    def from_embedding(
        cls, embedding: nn.Embedding, group: Any, *, sequence_parallel: bool = False,
        seq_dim: int = 1, name: str = "VocabParallelEmbedding",
    ) -> VocabParallelEmbedding:  # fmt: skip
        """Shard an existing ``nn.Embedding`` (its weight Parameter is reused, resized)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._init_from(embedding, group, sequence_parallel, seq_dim, name)
        return self

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_world_size == 1:
            return F.embedding(ids, self.weight, self.padding_idx)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        # padding_idx only freezes the gradient of the padding row: masked below instead
        out = F.embedding(local, self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.padding_idx is not None:
            out = out.masked_fill(
                (ids == self.padding_idx).unsqueeze(-1), 0.0
            ) + out.detach().masked_fill((ids != self.padding_idx).unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_region(out, self.group, self.seq_dim)
        return reduce_from_tp_region(out, self.group)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, tp={self.tp_world_size}, "
            f"rows [{self.vocab_start}, {self.vocab_end})"
        )
