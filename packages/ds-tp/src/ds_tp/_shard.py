"""How a tensor-parallel parameter's local tensor sits inside the full tensor.

A shard splits dimension ``dim`` of the full tensor. A fused weight (``gate_up_proj``, ``qkv``)
is several sub-parameters concatenated along ``dim`` (``sub_sizes``); each one is split on its
own and a rank's local tensor is the concatenation of its slice of each, so that the layer's
output keeps the fused layout ([gate_r, up_r] rather than a slice across the gate/up border).

The same description maps a range of the flattened local tensor onto ranges of the flattened
full tensor (:meth:`TPShard.global_ranges`), which is what a checkpoint needs to store a shard
as pieces of the full tensor and load it back at another tensor-parallel size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TPShard:
    """``full_shape``: the unsharded tensor's shape; ``dim``: the split dimension;
    ``sub_sizes``: sizes along ``dim`` of the fused sub-parameters (one entry when not fused);
    ``rank``/``world``: this slice's index and the tensor-parallel size."""

    full_shape: tuple[int, ...]
    dim: int
    sub_sizes: tuple[int, ...]
    rank: int
    world: int

    def __post_init__(self) -> None:
        if sum(self.sub_sizes) != self.full_shape[self.dim]:
            raise ValueError(
                f"sub-parameter sizes {self.sub_sizes} do not add up to dimension {self.dim} "
                f"of shape {self.full_shape}"
            )

    @property
    def local_shape(self) -> tuple[int, ...]:
        shape = list(self.full_shape)
        shape[self.dim] = sum(s // self.world for s in self.sub_sizes)
        return tuple(shape)

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's local tensor (a copy) cut out of ``full``."""
        pieces, start = [], 0
        for s in self.sub_sizes:
            n = s // self.world
            pieces.append(full.narrow(self.dim, start + self.rank * n, n))
            start += s
        return torch.cat(pieces, dim=self.dim).contiguous()

    def _segments(self) -> Iterator[tuple[int, int, int]]:
        """(local start along dim, global start along dim, length) per sub-parameter."""
        local = glob = 0
        for s in self.sub_sizes:
            n = s // self.world
            yield local, glob + self.rank * n, n
            local += n
            glob += s

    def global_ranges(self, local_offset: int, numel: int) -> list[tuple[int, int, int]]:
        """``(global_offset, local_offset, n)`` runs covering local flat range
        ``[local_offset, local_offset + numel)``: each run is contiguous in both tensors."""
        inner = math.prod(self.full_shape[self.dim + 1 :])
        local_d = self.local_shape[self.dim]
        full_d = self.full_shape[self.dim]
        period = local_d * inner  # local elements per outer index
        end = local_offset + numel
        out: list[tuple[int, int, int]] = []
        if numel <= 0:
            return out
        for outer in range(local_offset // period, (end - 1) // period + 1):
            for lstart, gstart, n in self._segments():
                lo = outer * period + lstart * inner
                hi = lo + n * inner
                a, b = max(lo, local_offset), min(hi, end)
                if a >= b:
                    continue
                g = outer * full_d * inner + gstart * inner + (a - lo)
                if out and out[-1][0] + out[-1][2] == g and out[-1][1] + out[-1][2] == a:
                    prev = out.pop()  # runs that touch in both tensors merge (dim 0 shards)
                    out.append((prev[0], prev[1], prev[2] + b - a))
                else:
                    out.append((g, a, b - a))
        return out


def check_divisible(name: str, what: str, size: int, world: int) -> None:
    """Refuse a split that would not be even, naming the layer and the sizes."""
    if size % world:
        raise ValueError(
            f"{name}: {what} {size} is not divisible by the tensor-parallel size {world}; "
            "choose a tensor-parallel size that divides it"
        )
