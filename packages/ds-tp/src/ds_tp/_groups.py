"""Tensor-parallel and data-parallel process groups (tp x dp = world).

Ranks ``[i * tp, (i + 1) * tp)`` form tensor-parallel group ``i``: consecutive ranks, so a
group sits inside one node whenever ``tp`` divides the GPUs per node (DeepSpeed's
``(data_parallel, tensor_parallel)`` mesh, tensor axis fastest). Data-parallel group ``j``
holds rank ``j`` of every tensor-parallel group.

The object answers the Megatron-style ``mpu`` calls (``get_tensor_model_parallel_group``,
``get_model_parallel_rank``, ``get_data_parallel_group`` ...) so it can be passed as ``mpu=``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallelGroups:
    """This rank's groups. ``tp_group``: the ranks holding the other slices of its layers;
    ``dp_group``: the ranks holding the same slices (replicas), over which gradients are
    reduced. Both are real groups (a group of one rank where the size is 1), so passing one
    to a collective never falls back to the world; None only without a process group."""

    tensor_parallel_size: int
    data_parallel_size: int
    tp_rank: int
    dp_rank: int
    tp_group: Any
    dp_group: Any

    # ---- Megatron / DeepSpeed ``groups`` names ----------------------------------------------
    def get_tensor_model_parallel_group(self) -> Any:
        return self.tp_group

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tensor_parallel_size

    def get_tensor_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_tensor_model_parallel_src_rank(self) -> int:
        """Global rank of tensor-parallel rank 0 of this rank's group."""
        return self.dp_rank * self.tensor_parallel_size

    # with only tp over dp, "model parallel" is tp (as DeepSpeed's groups module)
    get_model_parallel_group = get_tensor_model_parallel_group
    get_model_parallel_world_size = get_tensor_model_parallel_world_size
    get_model_parallel_rank = get_tensor_model_parallel_rank
    get_slice_parallel_group = get_tensor_model_parallel_group
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size
    get_slice_parallel_rank = get_tensor_model_parallel_rank

    def get_data_parallel_group(self) -> Any:
        return self.dp_group

    def get_data_parallel_world_size(self) -> int:
        return self.data_parallel_size

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_pipe_parallel_world_size(self) -> int:
        return 1

    def get_pipe_parallel_rank(self) -> int:
        return 0


def build_tensor_parallel_groups(tensor_parallel_size: int) -> TensorParallelGroups:
    """Create the groups on every rank (a collective: all ranks call it in the same order)."""
    if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise ValueError(
            f"tensor_parallel_size must be a positive int, got {tensor_parallel_size!r}"
        )
    if not (dist.is_available() and dist.is_initialized()):
        if tensor_parallel_size != 1:
            raise RuntimeError(
                f"tensor_parallel_size {tensor_parallel_size} needs an initialized process group; "
                "call ds_comm.init_distributed() first (launch with torchrun or ds-launch)"
            )
        return TensorParallelGroups(1, 1, 0, 0, None, None)
    world, rank = dist.get_world_size(), dist.get_rank()
    tp = tensor_parallel_size
    if world % tp:
        raise ValueError(
            f"tensor_parallel_size {tp} does not divide the world size {world}; choose a "
            "divisor of the number of ranks"
        )
    dp = world // tp
    tp_group: Any = None
    dp_group: Any = None
    # every rank creates every group, in the same order (new_group is collective)
    for i in range(dp):
        ranks = list(range(i * tp, (i + 1) * tp))
        g = dist.group.WORLD if tp == world else dist.new_group(ranks)
        if rank in ranks:
            tp_group = g
    for j in range(tp):
        ranks = list(range(j, world, tp))
        g = dist.group.WORLD if dp == world else dist.new_group(ranks)
        if rank in ranks:
            dp_group = g
    return TensorParallelGroups(tp, dp, rank % tp, rank // tp, tp_group, dp_group)
