"""One ZeRO-3 parameter's state on this rank only: DeepSpeed's local-partition accessors
(``safe_get_local_fp32_param``, ``safe_get_local_optimizer_state``, ``safe_get_local_grad`` and
their setters; ds-all serves them under ``deepspeed.utils``).

"Local" is the part of the flattened parameter whose fp32 state this rank holds. ds-zero
partitions buckets, not single parameters: a stage-3 bucket concatenates several parameters
(each start aligned) and every rank holds one equal, contiguous range of it. So this rank's
piece of one parameter is a contiguous range ``[start, end)`` of its flattened elements
(``local_param_range``), which differs in size between ranks and may be empty. DeepSpeed
instead cuts every parameter into equal pieces (``ds_tensor``, padded to a multiple of the
world size). What both guarantee, and what callers can rely on: the pieces of ranks
``0 .. N-1`` of the parameter's group, concatenated in rank order, are the flattened
parameter (here with no padding to trim).

None of these communicates: each rank reads or writes only its own storage, so a rank may
call them alone. Only ZeRO stage 3 has them, as in DeepSpeed; elsewhere they raise
``NotPartitionedError``, which points at the full accessors (collectives, every stage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ds_zero._bucket import Bucket, slot_of
from ds_zero._param_access import _check_key, owner_of

if TYPE_CHECKING:
    from ds_zero._zero import Zero

__all__ = [
    "NotPartitionedError",
    "local_param_grad",
    "local_param_range",
    "local_param_state",
    "set_local_param_grad",
    "set_local_param_state",
]


class NotPartitionedError(ValueError, AssertionError):
    """The parameter is not held by a ZeRO stage-3 engine, so it has no local partition.

    A ValueError (the argument is wrong) that is also an AssertionError, the type DeepSpeed's
    local accessors raise in this case, so code written against either catches it."""


@dataclass(frozen=True)
class _LocalPiece:
    """Where this rank's piece of one trainable stage-3 parameter lives."""

    zero: Zero
    bucket: Bucket
    partition: int
    """Index of the bucket's master partition in ``zero.trainable`` (the stepper's index)."""
    start: int
    """First element of the flattened parameter held here."""
    end: int
    """One past the last element held here (``start == end``: none)."""
    offset: int
    """Position of element ``start`` in this rank's partition tensors (master, states, grad)."""

    @property
    def numel(self) -> int:
        return self.end - self.start

    def of(self, partition_tensor: torch.Tensor) -> torch.Tensor:
        """This piece of a 1-D partition tensor (a view)."""
        return partition_tensor.reshape(-1)[self.offset : self.offset + self.numel]


def _locate(p: nn.Parameter, what: str) -> _LocalPiece | None:
    """This rank's piece of ``p``; None for a frozen parameter (no fp32 state, as DeepSpeed)."""
    zero = owner_of(p)
    if zero is None or id(p) not in zero.names:
        raise NotPartitionedError(
            f"{what}: this parameter is not held by a ZeRO engine; the local partition exists "
            "only for parameters of a model that deepspeed.initialize (or ds_zero.wrap) "
            "returned at ZeRO stage 3"
        )
    if zero.options.stage != 3:
        raise NotPartitionedError(
            f"{what}: the local partition exists at ZeRO stage 3 only (this engine runs stage "
            f"{zero.options.stage}); at stages 0-2 use the full accessors "
            "(safe_get_full_fp32_param, safe_get_full_optimizer_state, safe_get_full_grad, "
            "safe_set_full_*; ds_zero.full_param_state / full_param_grad)"
        )
    slot = slot_of(p)
    if slot is None or not slot.bucket.trainable:
        return None  # frozen: kept whole (persistent) or in a bucket with no optimizer state
    b = slot.bucket
    lo, hi = b.master_range
    first, n = b.layout.offsets[slot.index], b.layout.numels[slot.index]
    start, end = (min(max(edge - first, 0), n) for edge in (lo, hi))
    offset = first + start - lo if end > start else 0
    return _LocalPiece(zero, b, zero.trainable.index(b), start, end, offset)


def _check_local_size(piece: _LocalPiece, p: nn.Parameter, value: torch.Tensor, what: str) -> None:
    if value.numel() != piece.numel:
        name = piece.zero.names[id(p)]
        raise ValueError(
            f"{what}: this rank holds {piece.numel} elements of {name!r} (its flattened "
            f"elements [{piece.start}, {piece.end})), the value has {value.numel()} "
            f"{tuple(value.shape)}"
        )


def local_param_range(p: nn.Parameter) -> tuple[int, int] | None:
    """``(start, end)``: the elements of the flattened ``p`` whose fp32 state this rank holds
    (``start == end``: none); None for a frozen parameter. Ranks' ranges are consecutive in
    rank order and cover the parameter."""
    piece = _locate(p, "local_param_range")
    return None if piece is None else (piece.start, piece.end)


def local_param_state(p: nn.Parameter, key: str = "master") -> torch.Tensor | None:
    """This rank's piece of ``p``'s fp32 master (``key="master"``) or element-wise optimizer
    state ``key`` (``exp_avg``, ...): 1-D, fp32, on ``p``'s device; None for a frozen
    parameter. Where the state is already fp32 on that device this is a view of it, as
    DeepSpeed's is (write through ``set_local_param_state``, which also updates the parameter
    shard and offloaded copies)."""
    piece = _locate(p, "local_param_state")
    if piece is None:
        return None
    _check_key(piece.zero, key, "local_param_state")
    piece.zero.synchronize()  # an overlapping stepper may still be updating the partition
    state = piece.zero.stepper.state_tensors(piece.partition)[key]
    return piece.of(state).to(device=p.device, dtype=torch.float32)


@torch.no_grad()
def set_local_param_state(p: nn.Parameter, value: torch.Tensor, key: str = "master") -> None:
    """Write ``value`` (this rank's piece: ``local_param_range``'s size, any shape) into
    ``p``'s fp32 master or optimizer state ``key`` on this rank; nothing for a frozen
    parameter.

    For the master, this rank's compute-dtype shard follows at once, so a partitioned
    parameter gathers the new values at its next use; a parameter stage 3 keeps whole on
    every rank (under ``param_persistence_threshold``) shows the other ranks' new pieces
    after the next step's refresh (DeepSpeed's local setter updates no parameter copy at
    all; ``set_full_param_state`` is the collective that updates every copy at once)."""
    piece = _locate(p, "set_local_param_state")
    if piece is None:
        return
    _check_local_size(piece, p, value, "set_local_param_state")
    _check_key(piece.zero, key, "set_local_param_state")
    zero, b = piece.zero, piece.bucket
    zero.synchronize()
    dest = piece.of(zero.stepper.state_tensors(piece.partition)[key])
    dest.copy_(value.detach().reshape(-1).to(device=dest.device, dtype=dest.dtype))
    if b.master_commit is not None:
        b.master_commit()  # the stepper holding the state stores it and refreshes the shard
    elif key == "master":
        shard = b.param_shard_view()  # None: the parameter is read from the master itself
        if shard is not None:
            piece.of(shard).copy_(dest)


def local_param_grad(p: nn.Parameter) -> torch.Tensor | None:
    """This rank's piece of ``p``'s reduced gradient (1-D, fp32, on ``p``'s device): the
    values ``step()`` applies, averaged over the data-parallel group and, with fp16, times
    the loss scale. Stage 3 reduces every micro-step, so it holds the window's sum so far
    after each backward, until ``step()`` (``Zero.grad_fragments`` lists the errors); a view
    of it where it is fp32. None for a frozen parameter."""
    piece = _locate(p, "local_param_grad")
    if piece is None:
        return None
    grad = piece.zero.grad_partition(piece.bucket)
    return piece.of(grad).to(device=p.device, dtype=torch.float32)


@torch.no_grad()
def set_local_param_grad(p: nn.Parameter, value: torch.Tensor) -> None:
    """Replace this rank's piece of ``p``'s reduced gradient by ``value`` (the size of
    ``local_param_range``, any shape) before ``step()`` applies it; nothing for a frozen
    parameter."""
    piece = _locate(p, "set_local_param_grad")
    if piece is None:
        return
    _check_local_size(piece, p, value, "set_local_param_grad")
    dest = piece.of(piece.zero.grad_partition(piece.bucket))
    dest.copy_(value.detach().reshape(-1).to(device=dest.device, dtype=dest.dtype))
