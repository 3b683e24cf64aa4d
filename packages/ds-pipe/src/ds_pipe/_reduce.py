"""Gradient reductions after the last backward: tied weights, data-parallel replicas, clipping."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from ds_pipe import _comm


def _grads(params: Iterable[torch.nn.Parameter]) -> list[torch.Tensor]:
    out = []
    for p in params:
        if p.grad is None:
            # Every replica must put the same tensors in the same buckets, used or not.
            p.grad = torch.zeros_like(p)
        out.append(p.grad)
    return out


def all_reduce_bucketed(
    params: Sequence[torch.nn.Parameter],
    group: _comm.ProcessGroup | None,
    bucket_bytes: int,
    average_over: int = 1,
) -> None:
    """All-reduce (sum, then divide by ``average_over``) gradients in flat buckets.

    Flat buckets of a few MB turn hundreds of small collectives into a handful of large ones;
    gradients of different dtypes never share a bucket.
    """
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in _grads(params):
        by_dtype.setdefault(g.dtype, []).append(g)
    for grads in by_dtype.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for g in grads:
            bucket.append(g)
            size += g.numel() * g.element_size()
            if size >= bucket_bytes:
                _reduce_bucket(bucket, group, average_over)
                bucket, size = [], 0
        if bucket:
            _reduce_bucket(bucket, group, average_over)


def _reduce_bucket(bucket: list[torch.Tensor], group, average_over: int) -> None:
    flat = torch.cat([g.reshape(-1) for g in bucket])
    _comm.all_reduce(flat, group)
    if average_over > 1:
        flat.div_(average_over)
    offset = 0
    for g in bucket:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def clip_grad_norm(
    params: Sequence[torch.nn.Parameter],
    skip: set[int],
    max_norm: float,
    group: _comm.ProcessGroup | None,
) -> torch.Tensor:
    """Clip by the global norm over a whole pipeline; returns the norm before clipping.

    ``skip`` holds ids of parameters whose gradient another stage also holds (tied copies):
    each is counted once. Data-parallel replicas hold identical gradients after the
    data-parallel reduction, so the norm is summed over the pipeline group only.
    """
    device = params[0].device if params else torch.device("cpu")
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for p in params:
        if p.grad is not None and id(p) not in skip:
            sq += p.grad.detach().float().pow(2).sum()
    if group is not None:
        _comm.all_reduce(sq, group)
    norm = sq.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.detach().mul_(coef.to(p.grad.dtype))
    return norm
