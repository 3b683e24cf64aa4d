"""What a checkpoint is made of: fragments, i.e. contiguous ranges of flattened global tensors.

ds_zero and ds_pipe hand their state to ds_ckpt as fragments; ds_ckpt never imports them. A
fragment says which elements of which global tensor a rank holds, and carries a 1-D local tensor
with exactly those elements (the data to write on save, the destination to fill on load).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class FragmentLike(Protocol):
    """Anything with these attributes can be saved and loaded (ds_zero.Fragment, Fragment, ...).

    `offset` and `numel` address the row-major flattened global tensor; `tensor` is 1-D with
    `numel` elements and the fragment's `dtype`.
    """

    name: str
    global_shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    numel: int
    tensor: torch.Tensor


@dataclass
class Fragment:
    """A plain FragmentLike, for tests and for users without ds_zero."""

    name: str
    global_shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    numel: int
    tensor: torch.Tensor

    @classmethod
    def whole(cls, name: str, tensor: torch.Tensor) -> Fragment:
        """The entire `tensor` as one fragment (a replicated weight, a model on one rank)."""
        flat = tensor.detach().reshape(-1)
        return cls(name, tuple(tensor.shape), tensor.dtype, 0, flat.numel(), flat)

    @classmethod
    def slice_of(cls, name: str, tensor: torch.Tensor, offset: int, numel: int) -> Fragment:
        """Elements [offset, offset+numel) of the flattened `tensor`, as a view when possible."""
        flat = tensor.detach().reshape(-1)
        return cls(
            name, tuple(tensor.shape), tensor.dtype, offset, numel, flat[offset : offset + numel]
        )


def global_numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def check_fragments(fragments: Iterable[FragmentLike], *, for_load: bool) -> list[FragmentLike]:
    """Validate fragments up front so a bad one fails before any file is touched."""
    out = []
    role = "destination" if for_load else "source"
    for i, f in enumerate(fragments):
        for attr in ("name", "global_shape", "dtype", "offset", "numel", "tensor"):
            if not hasattr(f, attr):
                raise TypeError(
                    f"fragment #{i} ({type(f).__name__}) has no attribute {attr!r}; a fragment "
                    "needs name, global_shape, dtype, offset, numel and tensor (see "
                    "ds_ckpt.FragmentLike)"
                )
        name = f.name
        if not isinstance(name, str) or not name:
            raise ValueError(f"fragment #{i}: name must be a non-empty str, got {name!r}")
        shape = tuple(int(s) for s in f.global_shape)
        if any(s < 0 for s in shape):
            raise ValueError(f"fragment {name!r}: negative dimension in global_shape {shape}")
        total = global_numel(shape)
        if f.offset < 0 or f.numel < 0 or f.offset + f.numel > total:
            raise ValueError(
                f"fragment {name!r}: range [{f.offset}, {f.offset + f.numel}) lies outside the "
                f"global tensor of {total} elements (shape {shape}); fix offset/numel"
            )
        t = f.tensor
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fragment {name!r}: tensor must be a torch.Tensor, got {type(t)}")
        if t.dim() != 1 or t.numel() != f.numel:
            raise ValueError(
                f"fragment {name!r}: tensor must be 1-D with numel={f.numel} elements, got "
                f"shape {tuple(t.shape)}; pass a flat view (tensor.reshape(-1)[a:b])"
            )
        if t.dtype != f.dtype:
            raise ValueError(
                f"fragment {name!r}: tensor dtype {t.dtype} differs from the fragment's dtype "
                f"{f.dtype}"
            )
        if for_load and t.requires_grad and t.is_leaf:
            raise ValueError(
                f"fragment {name!r}: {role} tensor requires grad; pass tensor.detach() (a view "
                "of the same storage) so it can be filled in place"
            )
        out.append(f)
    return out
