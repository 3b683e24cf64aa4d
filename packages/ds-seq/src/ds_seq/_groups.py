"""Sequence-parallel and data-parallel process groups (sp x dp = world).

Ranks ``[i * sp, (i + 1) * sp)`` form sequence-parallel group ``i`` (consecutive ranks, so a
group sits inside one node whenever ``sp`` divides the GPUs per node, as in DeepSpeed's
``(data_parallel, sequence_parallel)`` mesh); data-parallel group ``j`` holds rank ``j`` of every
sequence-parallel group. Parameters are replicated over all ``sp * dp`` ranks, so ZeRO partitions
and reduces over the sequence-data-parallel group (the whole set); see
:meth:`SequenceParallelGroups.gradient_scale`.

The object also answers the Megatron-style ``mpu`` calls DeepSpeed's ``parallel_state_sp``
module answers (``get_sequence_parallel_group`` ...), so it can be passed as ``mpu=``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


@dataclass(frozen=True)
class SequenceParallelGroups:
    """This rank's groups. ``sp_group``: its sequence-parallel group; ``dp_group``: the ranks
    at its position in the other sequence-parallel groups; ``sp_dp_group``: every rank that
    holds a replica of the parameters (None when that is the default world group)."""

    sequence_parallel_size: int
    data_parallel_size: int
    sp_rank: int
    dp_rank: int
    sp_group: Any
    dp_group: Any
    sp_dp_group: Any = None

    # ---- DeepSpeed parallel_state_sp names -------------------------------------------------
    def get_sequence_parallel_group(self) -> Any:
        return self.sp_group

    def get_sequence_parallel_world_size(self) -> int:
        return self.sequence_parallel_size

    def get_sequence_parallel_rank(self) -> int:
        return self.sp_rank

    def get_sequence_data_parallel_group(self) -> Any:
        return self.sp_dp_group if self.sp_dp_group is not None else dist.group.WORLD

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.sequence_parallel_size * self.data_parallel_size

    def get_sequence_data_parallel_rank(self) -> int:
        return self.dp_rank * self.sequence_parallel_size + self.sp_rank

    # as DeepSpeed's parallel_state_sp: with only sp over dp, "model parallel" is sp
    get_model_parallel_group = get_sequence_parallel_group
    get_model_parallel_world_size = get_sequence_parallel_world_size
    get_model_parallel_rank = get_sequence_parallel_rank

    def get_data_parallel_group(self) -> Any:
        return self.dp_group

    def get_data_parallel_world_size(self) -> int:
        return self.data_parallel_size

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def gradient_scale(self) -> int:
        """Factor to apply to a gradient averaged over the sequence-data-parallel group so that
        it is summed over sequence-parallel ranks and averaged over data-parallel ones (what
        DeepSpeed's ZeRO does with ``sequence_parallel_size > 1``): each sequence-parallel
        rank holds only its tokens' share of the gradient of the whole sequence."""
        return self.sequence_parallel_size


def build_sequence_parallel_groups(sequence_parallel_size: int) -> SequenceParallelGroups:
    """Create the groups on every rank (a collective: all ranks call it in the same order)."""
    if not (dist.is_available() and dist.is_initialized()):
        if sequence_parallel_size != 1:
            raise RuntimeError(
                f"sequence_parallel_size={sequence_parallel_size} needs torch.distributed "
                "initialised (launch with ds-launch/torchrun) with a world it divides"
            )
        return SequenceParallelGroups(1, 1, 0, 0, None, None, None)
    world = dist.get_world_size()
    rank = dist.get_rank()
    sp = int(sequence_parallel_size)
    if sp < 1:
        raise ValueError(f"sequence_parallel_size must be >= 1, got {sequence_parallel_size}")
    if world % sp != 0:
        raise ValueError(
            f"world size {world} is not divisible by sequence_parallel_size {sp}; use a "
            f"sequence_parallel_size that divides {world}"
        )
    dp = world // sp
    sp_group = dp_group = None
    # new_group is collective over the world: every rank creates every group, in one order
    for i in range(dp):
        ranks = list(range(i * sp, (i + 1) * sp))
        g = dist.new_group(ranks)
        if rank in ranks:
            sp_group = g
    for j in range(sp):
        ranks = list(range(j, world, sp))
        g = dist.new_group(ranks)
        if rank in ranks:
            dp_group = g
    return SequenceParallelGroups(sp, dp, rank % sp, rank // sp, sp_group, dp_group, None)
