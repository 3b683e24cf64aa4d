"""Sequence-parallel groups for the engine: from ``sequence_parallel_size`` or from an ``mpu``
that carries sequence-parallel groups (``UlyssesSPAttentionHF.register_with_transformers``'s).

With sequence parallelism the parameters are replicated over all ``sp * dp`` ranks, so ZeRO
partitions and reduces over that set. ds-zero averages over its group; the engine multiplies the
loss by ``sp`` before backward so the gradient is summed over the sequence-parallel ranks (each
holds its tokens' share) and averaged over the data-parallel ones, as DeepSpeed's ZeRO does.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from ds_all._config import DeepSpeedConfig
from ds_all._config_base import ConfigError


def sequence_parallel_groups(cfg: DeepSpeedConfig, mpu: Any) -> Any:
    """ds_seq.SequenceParallelGroups when sequence parallelism is on, else None."""
    want = cfg.sequence_parallel_size
    has = getattr(mpu, "get_sequence_parallel_world_size", None)
    if mpu is not None and callable(has) and has() > 1:
        size = has()
        if want not in (1, size):
            raise ConfigError(f"sequence_parallel_size is {want} but the mpu passed to initialize() has sequence "
                              f"parallel groups of {size}; set \"sequence_parallel_size\": {size} or drop it")  # fmt: skip
        return _from_mpu(mpu, size)
    if want == 1:
        return None
    if mpu is not None:
        raise ConfigError(f"sequence_parallel_size {want} with an mpu that has no sequence parallel groups "
                          "(get_sequence_parallel_world_size): pass the mpu returned by "
                          "UlyssesSPAttentionHF.register_with_transformers, or no mpu")  # fmt: skip
    try:
        from ds_seq import build_sequence_parallel_groups
    except ImportError:
        raise ConfigError("sequence_parallel_size > 1 needs ds-seq (pip install ds-seq)") from None
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world % want != 0:
        raise ConfigError(f"sequence_parallel_size {want} does not divide the world size {world}; use a "
                          f"divisor of {world}")  # fmt: skip
    return build_sequence_parallel_groups(want)


def _from_mpu(mpu: Any, size: int) -> Any:
    import ds_seq

    if isinstance(mpu, ds_seq.SequenceParallelGroups):
        return mpu
    # a Megatron/DeepSpeed-style mpu: read its groups through DeepSpeed's parallel_state_sp names
    world = dist.get_world_size()
    sp_rank = mpu.get_sequence_parallel_rank()
    return ds_seq.SequenceParallelGroups(
        size, world // size, sp_rank, dist.get_rank() // size, mpu.get_sequence_parallel_group(),
        mpu.get_data_parallel_group() if hasattr(mpu, "get_data_parallel_group") else None,
        mpu.get_sequence_data_parallel_group() if hasattr(mpu, "get_sequence_data_parallel_group") else None,
    )  # fmt: skip


def zero_group(seq: Any) -> Any:
    """The group ZeRO spans under sequence parallelism (None: the default world group)."""
    group = seq.get_sequence_data_parallel_group()
    if group is None or dist.get_world_size(group) == dist.get_world_size():
        return None
    return group
