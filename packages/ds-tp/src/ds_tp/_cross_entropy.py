"""Cross-entropy over logits whose vocabulary is split over the tensor-parallel group.

The full logits never exist on one rank: the max, the target's logit, the sum of exponentials
(and, for label smoothing, the sum of logits) are each computed on the local slice and reduced
over the group, so the loss and its gradient equal ``F.cross_entropy`` on the full logits.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ds_tp._mappings import group_rank, group_size


def _reduce(x: torch.Tensor, group: Any, op: Any = dist.ReduceOp.SUM) -> torch.Tensor:
    if group_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, logits: torch.Tensor, target: torch.Tensor, group: Any, ignore_index: int,
        label_smoothing: float, vocab: int,
    ) -> torch.Tensor:  # fmt: skip
        z = logits.float()
        local_v = z.shape[-1]
        start = group_rank(group) * local_v
        zmax = _reduce(z.max(dim=-1).values, group, dist.ReduceOp.MAX)
        z = z - zmax.unsqueeze(-1)
        ignored = target == ignore_index
        local_t = target - start
        mine = (local_t >= 0) & (local_t < local_v) & ~ignored
        idx = local_t.masked_fill(~mine, 0)
        picked = z.gather(-1, idx.unsqueeze(-1)).squeeze(-1).masked_fill(~mine, 0.0)
        exp = z.exp()
        stats = [picked, exp.sum(dim=-1)]
        if label_smoothing > 0:
            stats.append(z.sum(dim=-1))
        packed = _reduce(torch.stack(stats), group)  # one all-reduce for all sums
        lse = packed[1].log()
        loss = lse - packed[0]
        if label_smoothing > 0:
            # F.cross_entropy's smoothing: (1 - eps) * nll + eps * mean over classes of -log p
            loss = (1 - label_smoothing) * loss + label_smoothing * (lse - packed[2] / vocab)
        loss = loss.masked_fill(ignored, 0.0)
        softmax = exp.div_(packed[1].unsqueeze(-1))
        ctx.save_for_backward(softmax, idx, mine, ignored)
        ctx.label_smoothing, ctx.vocab, ctx.dtype = label_smoothing, vocab, logits.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        softmax, idx, mine, ignored = ctx.saved_tensors
        eps = ctx.label_smoothing
        grad = softmax
        onehot = torch.zeros_like(grad).scatter_(-1, idx.unsqueeze(-1), 1.0)
        grad = grad - (1 - eps) * onehot * mine.unsqueeze(-1)
        if eps > 0:
            grad = grad - eps / ctx.vocab
        grad = grad * g.masked_fill(ignored, 0.0).unsqueeze(-1)
        return grad.to(ctx.dtype), None, None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    group: Any = None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """``F.cross_entropy(full_logits.view(-1, V), target.view(-1), ...)`` where ``logits`` is
    this rank's slice ``[..., V/tp]`` of the vocabulary (rank order) and ``target`` holds full
    vocabulary indices. ``reduction``: ``"mean"`` (over non-ignored targets), ``"sum"`` or
    ``"none"`` (shape of ``target``)."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if logits.shape[:-1] != target.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and target {tuple(target.shape)}: logits must be "
            "target's shape plus the vocabulary slice"
        )
    vocab = logits.shape[-1] * group_size(group)
    loss = _VocabParallelCE.apply(logits, target, group, ignore_index, label_smoothing, vocab)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    # as F.cross_entropy: nan when every target is ignored
    return loss.sum() / (target != ignore_index).sum()
