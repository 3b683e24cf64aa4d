"""Expert-parallel and expert-data-parallel process groups, one pair per ``ep_size``.

With ``W`` ranks and ``ep_size = P`` (P divides W):

- expert-parallel groups are P consecutive ranks ``[i*P, ..., i*P + P - 1]``; the experts of a
  layer are split over them and tokens move between them with all-to-all;
- expert-data-parallel groups are the ranks holding the same experts, ``[j, j + P, j + 2P,
  ...]``; expert gradients are reduced over them (dense gradients over the whole world).

The groups are named ``"ep_size_<P>"`` (DeepSpeed's naming). ``torch.distributed.new_group``
is collective over the world, so every rank creates every group in the same order; this
happens when the first MoE layer with a given ep_size is built, on every rank.
"""

from __future__ import annotations

import dataclasses

import torch.distributed as dist
from torch.distributed import ProcessGroup

import ds_comm
from ds_moe._config import check_ep_world


def group_name(ep_size: int) -> str:
    return f"ep_size_{ep_size}"


@dataclasses.dataclass(frozen=True)
class ExpertGroups:
    """The groups of one ``ep_size`` as seen by this rank."""

    name: str
    ep_size: int
    #: this rank's expert-parallel group; None when ep_size == 1 (no all-to-all needed)
    ep_group: ProcessGroup | None
    #: this rank's index inside its expert-parallel group (which slice of experts it holds)
    ep_rank: int
    #: this rank's expert-data-parallel group; None when torch.distributed is not initialised
    expert_dp_group: ProcessGroup | None
    #: ranks (global) of the expert-data-parallel group
    expert_dp_ranks: tuple[int, ...]

    def __deepcopy__(self, memo: dict) -> ExpertGroups:
        # handles to process-wide communicators: a deep-copied model shares them
        return self


class ExpertGroupRegistry:
    """Groups built so far in this process, per ``ep_size``.

    The registry remembers the world group it was built under and starts afresh when the
    default process group is replaced (a test that destroys and re-initialises it).
    """

    def __init__(self) -> None:
        self._world: object | None = None
        self._groups: dict[str, ExpertGroups] = {}

    def _check_world(self) -> None:
        world = dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
        if world is not self._world:
            self._world = world
            self._groups = {}

    def get_or_create(self, ep_size: int) -> ExpertGroups:
        self._check_world()
        name = group_name(ep_size)
        if name in self._groups:
            return self._groups[name]
        if self._world is None:
            if ep_size != 1:
                raise RuntimeError(
                    f"ep_size={ep_size} needs torch.distributed: initialise the process group "
                    "(ds_comm.init_distributed() or torch.distributed.init_process_group) before "
                    "building the MoE layer, or use ep_size=1"
                )
            groups = ExpertGroups(name, 1, None, 0, None, (0,))
        else:
            groups = self._create(ep_size)
        self._groups[name] = groups
        return groups

    @staticmethod
    def _create(ep_size: int) -> ExpertGroups:
        world, rank = dist.get_world_size(), dist.get_rank()
        check_ep_world(ep_size, world)
        ep_group: ProcessGroup | None = None
        for i in range(world // ep_size):
            ranks = list(range(i * ep_size, (i + 1) * ep_size))
            g = ds_comm.new_group(ranks) if ep_size > 1 else None
            if rank in ranks:
                ep_group = g
        dp_group: ProcessGroup | None = None
        dp_ranks: tuple[int, ...] = ()
        for j in range(ep_size):
            ranks = list(range(j, world, ep_size))
            g = dist.group.WORLD if ep_size == 1 else ds_comm.new_group(ranks)
            if rank in ranks:
                dp_group, dp_ranks = g, tuple(ranks)
        return ExpertGroups(
            group_name(ep_size), ep_size, ep_group, rank % ep_size, dp_group, dp_ranks
        )

    def lookup(self, name: str) -> ExpertGroups:
        self._check_world()
        try:
            return self._groups[name]
        except KeyError:
            known = ", ".join(sorted(self._groups)) or "none"
            raise KeyError(
                f"no expert groups named {name!r} on this rank (known: {known}); they are "
                "created when an MoE layer with that ep_size is built, or by "
                "ds_moe.create_expert_groups(ep_size)"
            ) from None


_default = ExpertGroupRegistry()


def default_registry() -> ExpertGroupRegistry:
    return _default


def set_default_registry(registry: ExpertGroupRegistry) -> ExpertGroupRegistry:
    """Swap the process-wide registry (tests); returns the previous one."""
    global _default
    previous, _default = _default, registry
    return previous


def create_expert_groups(ep_size: int) -> ExpertGroups:
    """Build (collectively, on every rank) or return the groups for ``ep_size``."""
    return _default.get_or_create(ep_size)


def get_expert_parallel_group(name: str) -> ProcessGroup | None:
    """The expert-parallel group named ``"ep_size_<n>"`` holding this rank (None for n = 1)."""
    return _default.lookup(name).ep_group


def get_expert_data_parallel_group(name: str) -> ProcessGroup | None:
    """The group over which the experts of group ``name`` have their gradients reduced."""
    return _default.lookup(name).expert_dp_group


def get_expert_parallel_group_dict() -> dict[str, ProcessGroup | None]:
    """Every expert-parallel group built so far on this rank, by name (DeepSpeed's
    ``groups._get_expert_parallel_group_dict``)."""
    _default._check_world()
    return {name: g.ep_group for name, g in _default._groups.items()}


def get_expert_parallel_world_size(name: str) -> int:
    """Ranks in the expert-parallel group ``name`` (its ``ep_size``)."""
    return _default.lookup(name).ep_size


def get_expert_parallel_rank(name: str) -> int:
    """This rank's index in the expert-parallel group ``name``."""
    return _default.lookup(name).ep_rank


def get_expert_data_parallel_world_size(name: str) -> int:
    """Ranks in this rank's expert-data-parallel group of ``name``."""
    return len(_default.lookup(name).expert_dp_ranks)


def get_expert_data_parallel_rank(name: str) -> int:
    """This rank's index in its expert-data-parallel group of ``name``."""
    groups = _default.lookup(name)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return groups.expert_dp_ranks.index(rank)
