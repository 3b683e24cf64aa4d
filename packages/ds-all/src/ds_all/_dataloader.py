"""A DataLoader over the engine's data-parallel rank (DeepSpeed's ``training_data`` argument)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler


def make_dataloader(dataset: Any, micro_batch: int, world_size: int, rank: int,
                    collate_fn: Any = None, seed: int = 0, drop_last: bool = True) -> DataLoader:  # fmt: skip
    """Each rank gets its own shard of ``dataset`` in micro-batches; shuffled per epoch."""
    sampler = None
    if world_size > 1:
        sampler = DistributedSampler(
            dataset,
            num_replicas=world_size,
            rank=rank,
            shuffle=True,
            seed=seed,
            drop_last=drop_last,
        )
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=micro_batch, sampler=sampler, shuffle=sampler is None,
        collate_fn=collate_fn, drop_last=drop_last, generator=generator if sampler is None else None,
    )  # fmt: skip
