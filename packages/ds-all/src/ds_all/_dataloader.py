"""A DataLoader over the engine's data-parallel rank (DeepSpeed's ``training_data`` argument)."""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader, DistributedSampler


def make_dataloader(dataset: Any, micro_batch: int, world_size: int, rank: int,
                    collate_fn: Any = None, drop_last: bool = False) -> DataLoader:  # fmt: skip
    """Each rank gets its shard of ``dataset`` in micro-batches.

    As DeepSpeed's loader does: a DistributedSampler (shuffled, seed 0) even on one rank, and
    the same order every epoch unless the script calls ``loader.sampler.set_epoch(epoch)``; so a
    script gets the same batches under either library.
    """
    sampler = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=0, drop_last=drop_last
    )
    return DataLoader(
        dataset, batch_size=micro_batch, sampler=sampler, collate_fn=collate_fn, drop_last=drop_last
    )
