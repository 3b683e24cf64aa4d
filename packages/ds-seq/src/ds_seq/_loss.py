"""The loss over the whole sequence from per-shard token losses.

Each rank of a sequence-parallel group holds ``sum_r`` (the sum of its tokens' losses) and
``n_r`` (its tokens that are not ``ignore_index``). The loss is ``sum(sum_r) / sum(n_r)``, the
mean over every non-ignored token of the sequence, which is exactly the unsharded loss.

Its value is the same on every rank, but the gradient each rank back-propagates is only its own
share, ``d(sum_r) / sum(n_r)``: the Ulysses exchanges route the cross-rank terms back, so
summing the ranks' parameter gradients over the group gives the gradient of the whole-sequence
loss (ds-all's engine sums over the sequence-parallel ranks and averages over data-parallel
ones, as DeepSpeed's ZeRO does). Combining with ``torch.distributed.nn.functional.all_gather``
instead (ALST's recipe) makes every rank's gradient ``sp`` times its share, because that
all-gather's backward sums the gradient over the group.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def loss_sum_and_count(
    logits: Tensor, shift_labels: Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor]:
    """(sum of token cross-entropies in fp32, number of non-ignored tokens) for already-shifted
    labels (``UlyssesSPDataLoaderAdapter``'s ``shift_labels``)."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    target = shift_labels.reshape(-1).to(flat.device)
    total = F.cross_entropy(flat, target, ignore_index=ignore_index, reduction="sum")
    return total, (target != ignore_index).sum()


def sequence_parallel_loss(loss_sum: Tensor, num_tokens: Tensor | int, group: Any) -> Tensor:
    """Mean token loss over the whole sequence of the sequence-parallel ``group`` (see the
    module docstring for the gradient each rank gets). ``num_tokens`` counts this rank's
    non-ignored tokens; a sequence with none gives 0, not NaN."""
    count = torch.as_tensor(num_tokens, dtype=torch.float32, device=loss_sum.device).reshape(())
    summed = torch.stack([loss_sum.detach().float().reshape(()), count])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(summed, group=group)
    total = summed[1].clamp(min=1.0)
    local = loss_sum.float() / total
    return local + (summed[0] / total - local).detach()


def sequence_parallel_causal_lm_loss(
    logits: Tensor, shift_labels: Tensor, group: Any, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Whole-sequence causal-LM loss from this rank's logits and shifted labels."""
    total, count = loss_sum_and_count(logits, shift_labels, ignore_index)
    return sequence_parallel_loss(total, count, group)
