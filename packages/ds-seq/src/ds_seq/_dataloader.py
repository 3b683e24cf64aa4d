"""``UlyssesSPDataLoaderAdapter``: shard every batch of a DataLoader along the sequence."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``shift_labels[:, t] = labels[:, t + 1]``, the last position ``ignore_index``. Done on the
    whole sequence before sharding, so the target of a shard's last token (the first token of
    the next shard) stays with it."""
    return torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:].contiguous()


class UlyssesSPDataLoaderAdapter:
    """Wraps a DataLoader for Ulysses sequence parallelism (DeepSpeed's class and arguments).

    The ranks of a sequence-parallel group each draw one batch from their own DataLoader; the
    adapter gathers those ``sp`` batches and yields them one after the other, each rank getting
    its sequence shard of the same batch: iteration ``i`` of a cycle is batch ``i``'s shards.
    ``len(adapter) == len(dl) * sp``.

    Each batch is a dict of ``[batch, seqlen, ...]`` tensors that must hold ``input_ids``,
    ``position_ids`` and ``labels`` (other keys are sharded the same way; non-tensors are copied
    to every rank). ``labels`` is replaced by ``shift_labels`` (shifted on the whole sequence,
    -100 at the end), so a causal-LM loss over the shards uses ``shift_labels`` unshifted. Shards
    are returned on the CPU, as DeepSpeed does (at very long sequences the gathered batch would
    take device memory); move them to the device before the forward. The sequence length of a
    batch must be divisible by ``sp_world_size``; batches of different lengths are fine.
    """

    def __init__(
        self, dl: Any, sp_rank: int, sp_group: Any, sp_world_size: int, device: Any
    ) -> None:
        self.dl = dl
        self.sp_rank = sp_rank
        self.sp_group = sp_group
        self.sp_world_size = sp_world_size
        self.device = device
        self.iter: Iterator[Any] = iter(dl)
        self.micro_batches: deque[dict[str, Any]] = deque()

    def __len__(self) -> int:
        return len(self.dl) * self.sp_world_size

    def __iter__(self) -> UlyssesSPDataLoaderAdapter:
        return self

    def __next__(self) -> dict[str, Any]:
        if not self.micro_batches:
            self.refill()
        return self.micro_batches.popleft()

    def refill(self) -> None:
        try:
            batch = next(self.iter)
        except StopIteration:
            # a fresh iterator for the next epoch, as DeepSpeed's adapter
            self.iter = iter(self.dl)
            raise
        if not isinstance(batch, dict) or "input_ids" not in batch:
            raise ValueError("UlyssesSPDataLoaderAdapter: each batch must be a dict with input_ids, position_ids "
                             f"and labels; got {type(batch).__name__}")  # fmt: skip
        for key in ("position_ids", "labels"):
            if key not in batch:
                raise ValueError(
                    f"Ulysses SP requires `{key}` in every dataloader batch"
                    + (
                        " so that each token keeps its global position after sequence sharding: "
                        "position_ids = torch.arange(seq_len) per sample (reset at document "
                        "boundaries for packed sequences)"
                        if key == "position_ids"
                        else " (the adapter shifts them before sharding)"
                    )
                )
        seqlen = batch["input_ids"].shape[1]
        ws = self.sp_world_size
        mine = torch.full((1,), seqlen, dtype=torch.int64, device=self.device)
        lens_t = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(ws)]
        dist.all_gather(lens_t, mine, group=self.sp_group)
        lens = [int(t.item()) for t in lens_t]
        gathered: list[dict[str, Any]] = [{} for _ in range(ws)]
        for key, value in batch.items():
            if torch.is_tensor(value):
                value = value.to(self.device)
                if value.dim() < 2 or value.shape[1] != seqlen:
                    raise ValueError(f"{key}'s shape {tuple(value.shape)} must match input_ids's shape "
                                     f"{tuple(batch['input_ids'].shape)} in its first two dims")  # fmt: skip
                # gloo (unlike NCCL) gathers only equal shapes: pad to the longest, then trim
                longest = max(lens)
                padded = value.new_zeros((value.shape[0], longest, *value.shape[2:]))
                padded[:, :seqlen] = value
                parts = [torch.empty_like(padded) for _ in lens]
                dist.all_gather(parts, padded, group=self.sp_group)
                parts = [p[:, :n] for p, n in zip(parts, lens, strict=True)]
            else:
                parts = [None] * ws
                dist.all_gather_object(parts, value, group=self.sp_group)
            for r in range(ws):
                gathered[r][key] = parts[r]
        for full in gathered:
            length = full["input_ids"].shape[1]
            if length % ws != 0:
                raise ValueError(f"batch's seqlen={length} isn't divisible by sp-size={ws}; pad the "
                                 f"batches to a multiple of {ws}")  # fmt: skip
            chunk = length // ws
            full["shift_labels"] = shift_labels(full.pop("labels"))
            lo, hi = chunk * self.sp_rank, chunk * (self.sp_rank + 1)
            self.micro_batches.append(
                {k: (v[:, lo:hi].cpu() if torch.is_tensor(v) else v) for k, v in full.items()}
            )
