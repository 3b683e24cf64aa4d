"""Named accelerator RNG states for tensor-parallel dropout (DeepSpeed's and Megatron's tracker).

Dropout inside a tensor-parallel region must differ between the tensor-parallel ranks (each holds
a different slice) yet repeat exactly when activation checkpointing recomputes the region. The
tracker keeps one generator state per name; ``fork(name)`` runs a block on that state and keeps
what the block advanced it to, leaving the default generator as it was. ``checkpoint()`` replays
the states a forward saw when it recomputes (see ``ds_all.checkpointing``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from ds_accel import get_accelerator

#: the name Megatron and DeepSpeed fork for dropout in tensor-parallel regions
MODEL_PARALLEL_RNG_TRACKER_NAME = "model-parallel-rng"


def seeded_state(seed: int) -> torch.Tensor:
    """The accelerator generator's state after seeding it with ``seed``, computed on a private
    generator: the process's own generators (CPU ones included) are not touched."""
    return torch.Generator(device=get_accelerator().device()).manual_seed(seed).get_state()


class CudaRNGStatesTracker:
    """Accelerator RNG states by name (DeepSpeed's class name; any accelerator, CPU included)."""

    states_: dict[str, torch.Tensor]
    seeds_: set[int]

    def __init__(self) -> None:
        self.states_ = {}
        self.seeds_ = set()

    def reset(self) -> None:
        """Forget every state and seed."""
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        """A copy of the name -> state map (the states themselves are not cloned)."""
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        """Track a new state ``name`` seeded with ``seed``; both must be new."""
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name!r} already exists")
        self.seeds_.add(seed)
        self.states_[name] = seeded_state(seed)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        """Run the block on state ``name``; afterwards the default state is what it was."""
        if name not in self.states_:
            raise KeyError(f"rng state {name!r} is not added")
        acc = get_accelerator()
        outer = acc.get_rng_state()
        acc.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = acc.get_rng_state()
            acc.set_rng_state(outer)


def tensor_parallel_rank(mpu: Any) -> int:
    """This rank's index in its tensor-parallel group, from a Megatron-style ``mpu`` (0 without
    one): the newer name first, then DeepSpeed's slice and Megatron's older model-parallel."""
    if mpu is None:
        return 0
    for name in (
        "get_tensor_model_parallel_rank",
        "get_slice_parallel_rank",
        "get_model_parallel_rank",
    ):
        get = getattr(mpu, name, None)
        if callable(get):
            return int(get())
    return 0


__all__ = [
    "MODEL_PARALLEL_RNG_TRACKER_NAME",
    "CudaRNGStatesTracker",
    "seeded_state",
    "tensor_parallel_rank",
]
