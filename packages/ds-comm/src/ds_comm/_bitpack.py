"""Sign bits packed 8 per byte (most significant bit first, as ``numpy.packbits``).

Pure tensor code so it runs on any device; the shift tables are tiny and cached per device.
"""

from __future__ import annotations

import torch

_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _shifts(device: torch.device) -> torch.Tensor:
    s = _SHIFTS.get(device)
    if s is None:
        s = _SHIFTS[device] = torch.arange(7, -1, -1, dtype=torch.uint8, device=device)
    return s


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Bit ``i`` is 1 where ``x[i] >= 0`` (zero counts as positive, as in 1-bit Adam).

    ``x.numel()`` must be a multiple of 8; returns ``x.numel() // 8`` uint8 values.
    """
    if x.numel() % 8:
        raise ValueError(f"pack_signs: numel {x.numel()} is not a multiple of 8")
    bits = (x.reshape(-1, 8) >= 0).to(torch.uint8)
    # Distinct bit positions, so the sum equals the bitwise or and cannot overflow a byte.
    return (bits << _shifts(x.device)).sum(dim=1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`pack_signs` as +1/-1 values of ``dtype`` (``packed.numel() * 8``)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_signs: expected uint8, got {packed.dtype}")
    bits = (packed.reshape(-1, 1) >> _shifts(packed.device)) & 1
    return bits.reshape(-1).to(dtype).mul_(2).sub_(1)
