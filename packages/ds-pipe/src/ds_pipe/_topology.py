"""Rank <-> (pipe, data, model) coordinates: pure math, no process group.

Ranks are laid out row-major over the axes in the order given, the last axis varying fastest
(DeepSpeed's convention): with axes ``("pipe", "data")`` and dims ``(2, 2)`` ranks 0 and 1 are
stage 0 of replicas 0 and 1, ranks 2 and 3 are stage 1. Keeping data-parallel peers on
neighbouring ranks puts their all-reduce on the fastest links of a node.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import NamedTuple


class ProcessTopology:
    """A Cartesian grid of ranks with named axes."""

    def __init__(self, axes: Sequence[str], dims: Sequence[int]) -> None:
        if len(axes) != len(dims):
            raise ValueError(f"topology has {len(axes)} axes {list(axes)} but {len(dims)} dims")
        if len(set(axes)) != len(axes):
            raise ValueError(f"topology axes must be distinct, got {list(axes)}")
        for axis, dim in zip(axes, dims):
            if dim < 1:
                raise ValueError(f"topology axis {axis!r} has size {dim}; sizes must be >= 1")
        self.axes: tuple[str, ...] = tuple(axes)
        self.dims: tuple[int, ...] = tuple(int(d) for d in dims)
        self.Coord = NamedTuple("Coord", [(a, int) for a in self.axes])  # type: ignore[misc]
        self._coords = [self.Coord(*c) for c in itertools.product(*(range(d) for d in self.dims))]

    # DeepSpeed's ProcessTopology API (world_size() is a method there, so it is one here:
    # code written against DeepSpeed's topology runs unchanged).

    def world_size(self) -> int:
        return len(self._coords)

    def get_axis_names(self) -> list[str]:
        return list(self.axes)

    def get_dim(self, axis: str) -> int:
        """Size of ``axis``; 0 for an axis the topology does not have (as DeepSpeed)."""
        return self.dims[self.axes.index(axis)] if axis in self.axes else 0

    def get_coord(self, rank: int):  # -> self.Coord
        if not 0 <= rank < self.world_size():
            raise ValueError(
                f"rank {rank} is outside the topology (world size {self.world_size()})"
            )
        return self._coords[rank]

    def get_rank(self, **coords: int) -> int:
        """The rank at the given coordinates; every axis must be named."""
        if set(coords) != set(self.axes):
            raise ValueError(f"get_rank needs exactly the axes {self.axes}, got {sorted(coords)}")
        rank = 0
        for axis, dim in zip(self.axes, self.dims):
            c = coords[axis]
            if not 0 <= c < dim:
                raise ValueError(f"coordinate {axis}={c} is outside 0..{dim - 1}")
            rank = rank * dim + c
        return rank

    def get_rank_repr(
        self,
        rank: int,
        omit_axes: Sequence[str] = ("data", "pipe"),
        inner_sep: str = "_",
        outer_sep: str = "-",
    ) -> str:
        """``"model_01"``-style name of ``rank``'s coordinates without ``omit_axes``.

        DeepSpeed names per-slice checkpoint files with it, so the same strings come out here.
        """
        coord = self.get_coord(rank)
        return outer_sep.join(
            f"{a}{inner_sep}{getattr(coord, a):02d}" for a in self.axes if a not in set(omit_axes)
        )

    def get_axis_list(self, axis: str, idx: int) -> list[int]:
        """Ranks whose coordinate along ``axis`` is ``idx``."""
        if axis not in self.axes:
            raise ValueError(f"{self} has no axis {axis!r}; its axes are {list(self.axes)}")
        return self.filter_match(**{axis: idx})

    def get_axis_comm_lists(self, axis: str) -> list[list[int]]:
        """Groups of ranks differing only along ``axis`` ([] for a missing axis, as DeepSpeed)."""
        return self.axis_groups(axis) if axis in self.axes else []

    def filter_match(self, **coords: int) -> list[int]:
        """Ranks whose coordinates match every given axis value."""
        unknown = sorted(set(coords) - set(self.axes))
        if unknown:
            raise ValueError(f"{self} has no axis {unknown}; its axes are {list(self.axes)}")
        return [
            r
            for r, c in enumerate(self._coords)
            if all(getattr(c, a) == v for a, v in coords.items())
        ]

    def axis_groups(self, axis: str) -> list[list[int]]:
        """Ranks that differ only along ``axis``, one list per combination of the other axes."""
        if axis not in self.axes:
            return [[r] for r in range(self.world_size())]
        others = [a for a in self.axes if a != axis]
        groups: dict[tuple[int, ...], list[int]] = {}
        for r, c in enumerate(self._coords):
            groups.setdefault(tuple(getattr(c, a) for a in others), []).append(r)
        return list(groups.values())

    def __repr__(self) -> str:
        inner = ", ".join(f"{a}={d}" for a, d in zip(self.axes, self.dims))
        return f"ProcessTopology({inner})"


class PipeDataParallelTopology(ProcessTopology):
    """Pipeline x data parallelism; data-parallel peers are neighbouring ranks."""

    def __init__(self, num_pp: int, num_dp: int) -> None:
        super().__init__(axes=("pipe", "data"), dims=(num_pp, num_dp))


class PipeModelDataParallelTopology(ProcessTopology):
    """Pipeline x data x tensor-model parallelism (model axis fastest)."""

    def __init__(self, num_pp: int, num_mp: int, num_dp: int) -> None:
        super().__init__(axes=("pipe", "data", "model"), dims=(num_pp, num_dp, num_mp))
