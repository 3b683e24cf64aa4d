"""The tensor-parallel group of an inference engine, and the random state its ranks share.

The group comes from, in DeepSpeed's order: ``tensor_parallel.mpu`` (its model-parallel group,
whose size becomes tp_size), or, with ``tp_size`` > 1, ``tensor_parallel.tp_group`` when given
(it must have tp_size ranks) or new groups of consecutive ranks (``[0, tp)``, ``[tp, 2 tp)``
...; DeepSpeed builds only the first, so a world larger than tp_size leaves its other ranks
without a group; here each holds a replica). The process group is initialised when needed.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from ds_all._config_base import ConfigError


def resolve_group(tp: Any) -> tuple[Any, int]:
    """``(group, size)`` for the ``tensor_parallel`` section ``tp``; size 1: no split."""
    if tp.mpu is not None:
        get = getattr(tp.mpu, "get_model_parallel_group", None)
        if not callable(get):
            raise ConfigError(
                "tensor_parallel.mpu (or the deprecated mpu): expected an object with "
                f"get_model_parallel_group(), got {type(tp.mpu).__name__}"
            )
        group = get()
        size = dist.get_world_size(group=group)
        if tp.tp_size not in (1, size):
            raise ConfigError(
                f"tensor_parallel.tp_size is {tp.tp_size} but the mpu's model-parallel group has "
                f"{size} ranks; leave tp_size out (the mpu decides) or make them equal"
            )
        return group, size
    if tp.tp_size <= 1:
        return tp.tp_group, 1
    _init_process_group()
    if tp.tp_group is not None:
        have = dist.get_world_size(group=tp.tp_group)
        if have != tp.tp_size:
            raise ConfigError(
                f"tensor_parallel.tp_group has {have} ranks but tensor_parallel.tp_size is "
                f"{tp.tp_size}; make them equal"
            )
        return tp.tp_group, tp.tp_size
    import ds_tp

    try:
        groups = ds_tp.build_tensor_parallel_groups(tp.tp_size)
    except ValueError as e:
        raise ConfigError(f"tensor_parallel.tp_size: {e}") from None
    return groups.tp_group, tp.tp_size


def _init_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        return
    from ds_accel import get_accelerator
    from ds_all._initialize import init_distributed

    init_distributed()
    # as DeepSpeed: each launched process drives the device of its local rank
    if get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))


def share_random_state(group: Any) -> None:
    """Give every rank of ``group`` the random state of its first rank, so sampling (e.g.
    ``generate(do_sample=True)``) draws the same tokens on each rank of a split model."""
    from ds_accel import get_accelerator

    accel = get_accelerator()
    device = accel.current_device_name()
    src = dist.get_global_rank(group, 0) if group is not dist.group.WORLD else 0
    states = [(accel.get_rng_state, accel.set_rng_state)]
    if accel.device_name() != "cpu":
        states.append((torch.get_rng_state, torch.set_rng_state))  # the host generator too
    for get, put in states:
        state = get().to(device)
        dist.broadcast(state, src=src, group=group)
        put(state.cpu())
