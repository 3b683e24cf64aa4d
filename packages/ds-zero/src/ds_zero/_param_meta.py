"""DeepSpeed's stage-3 parameter attributes, and the full shape of a parameter whose data is
released.

A released stage-3 parameter's ``.data`` is a tensor with no elements, as DeepSpeed's is: code
outside ds-zero that touches a parameter it did not gather (an in-place init of a child's weight
inside ``GatheredParameters`` of the parent) does nothing instead of failing, and reads the
full size from ``ds_shape`` / ``ds_numel``, the names DeepSpeed and its users read.
"""

from __future__ import annotations

import torch
from torch import nn


def mark_stage3(p: nn.Parameter, shape: torch.Size, ds_id: int) -> None:
    """Give ``p`` DeepSpeed's ``ds_id``, ``ds_shape`` and ``ds_numel`` (its full size)."""
    p.ds_id = ds_id  # type: ignore[attr-defined]
    p.ds_shape = torch.Size(shape)  # type: ignore[attr-defined]
    p.ds_numel = torch.Size(shape).numel()  # type: ignore[attr-defined]


def full_shape(p: torch.Tensor) -> torch.Size:
    """The parameter's shape when whole, whether or not its data is released now."""
    shape = getattr(p, "ds_shape", None)
    if shape is not None and p.numel() == 0:
        return torch.Size(shape)
    return p.shape


def full_numel(p: torch.Tensor) -> int:
    return full_shape(p).numel()


def released_data(like: torch.Tensor) -> torch.Tensor:
    """What a released parameter's ``.data`` is: no elements, the parameter's dtype and device."""
    return torch.empty(0, dtype=like.dtype, device=like.device)
