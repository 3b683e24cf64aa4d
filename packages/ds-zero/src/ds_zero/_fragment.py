"""The fragment: the unit of state that ds-zero hands to a checkpointer (ds-ckpt) and back."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Fragment:
    """A contiguous piece of one named global tensor, held by this rank.

    ``offset`` and ``numel`` index the row-major flattened global tensor. ``tensor`` is 1-D with
    ``numel`` elements: the local data when saving, the destination to fill when loading (it is a
    view of ZeRO's own storage, so filling it in place loads it).
    """

    name: str
    global_shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    numel: int
    tensor: torch.Tensor

    def __post_init__(self) -> None:
        total = math.prod(self.global_shape)
        if self.offset < 0 or self.numel < 0 or self.offset + self.numel > total:
            raise ValueError(
                f"Fragment {self.name!r}: range [{self.offset}, {self.offset + self.numel}) is "
                f"outside the global tensor of {total} elements (shape {self.global_shape})"
            )
        if self.tensor.dim() != 1 or self.tensor.numel() != self.numel:
            raise ValueError(
                f"Fragment {self.name!r}: tensor must be 1-D with {self.numel} elements, got "
                f"shape {tuple(self.tensor.shape)}"
            )
