"""Public block-wise quantization functions over the ``quantizer`` op (see ``_quant_op``)."""

from __future__ import annotations

import torch

from ds_kernels._quant_op import DEFAULT_BLOCK


def quantize_blockwise(
    x: torch.Tensor, bits: int = 8, block: int = DEFAULT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric block-wise quantization of ``x`` along its last dimension.

    Returns ``(codes, scales)``: int8 codes of ``x``'s shape (``bits=8``) or uint8 bytes holding
    two int4 codes each, ``ceil(n / 2)`` per row (``bits=4``); fp32 scales of shape
    ``(*x.shape[:-1], ceil(n / block))``. ``block`` is a power of two; the last block of a row
    is zero-padded. Error bound: ``|x - dequantize(...)| <= scale / 2`` element-wise."""
    from ds_kernels._ops import load

    return load("quantizer").quantize(x, bits, block)  # type: ignore[attr-defined]


def dequantize_blockwise(
    codes: torch.Tensor,
    scales: torch.Tensor,
    *,
    bits: int = 8,
    block: int = DEFAULT_BLOCK,
    numel: int | None = None,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: values of ``dtype`` with ``numel`` per row (default
    the int8 code count, or twice the int4 byte count: pass it for odd int4 rows). With ``out``
    (as many elements, that dtype and device; any shape) the values are written there and
    ``out`` is returned: on CUDA, into a contiguous ``out`` directly, with no extra pass."""
    from ds_kernels._ops import load

    return load("quantizer").dequantize(codes, scales, bits, block, numel, dtype, out)  # type: ignore[attr-defined]
