"""The ``quantizer`` op: symmetric block-wise int8 / int4 quantization with fp32 scales.

Layout (the same for every implementation, so a tensor quantized by one is dequantized by any):

- the input is viewed as rows along its last dimension (a 1-D tensor is one row of ``n``);
  each row is cut into ``ceil(n / block)`` blocks, the last one padded with zeros;
- per block ``scale = absmax / qmax`` in fp32 (``qmax`` 127 for int8, 7 for int4) and
  ``q = floor(x * (qmax / absmax) + 0.5)``, which lies in ``[-qmax, qmax]``: ``x * inv`` is at
  most ``qmax`` times ``1 + 2**-24`` in magnitude, so ``+ 0.5`` never reaches the next
  integer (the fallback clamps anyway; the kernels need not). ``-128`` / ``-8`` are never
  produced, so the code range is symmetric (no bias towards negative values);
- an all-zero block, and one whose absmax is below ``TINY`` (``2**-119``, about 1.5e-36), has
  scale 0 and all-zero codes;
- a block holding a NaN has a NaN scale and one holding an infinity (no NaN) an infinite
  scale, so every value of it dequantizes to NaN or an infinity: a non-finite gradient stays
  non-finite through qgZ, where the loss scaler's overflow check sees it. Its codes are
  unspecified;
- int8 codes have the input's shape (``int8``); int4 codes are packed two per byte (``uint8``,
  the even element in the low nibble), ``ceil(n / 2)`` bytes per row;
- scales have shape ``(*leading, ceil(n / block))``.

Round-trip error: ``|x - dequantize(quantize(x))| <= scale / 2`` element-wise, plus the rounding
of the output dtype; in a block below ``TINY``, the value itself (under ``2**-119``).

Every implementation computes the same IEEE fp32 operations in the same order, so they agree bit
for bit (codes, scales and dequantized values; for non-finite blocks, scales and dequantized
values): ``scale`` and ``inv = qmax / absmax`` are correctly rounded divisions, ``y = x * inv``
and ``y + 0.5`` are each rounded to fp32 (never one fused multiply-add), ``floor`` is exact, and
dequantize rounds the fp32 product ``q * scale`` to the output dtype to nearest-even.

``TorchQuantizer`` (fallback) is vectorised: one pass of torch ops over the padded
``(rows, blocks, block)`` view, no Python loop over blocks. ``TritonQuantizer`` runs one
program per tile of consecutive blocks (about 4096 values) on CUDA tensors and the fallback on
any other device.
"""

from __future__ import annotations

import math

import torch

from ds_kernels._registry import Backend, OpImpl

QMAX = {8: 127, 4: 7}
DEFAULT_BLOCK = 4096
#: blocks whose absmax is below this are stored as zeros (scale 0, codes 0): from here down
#: ``qmax / absmax`` would overflow fp32 to infinity (every code saturated, 0 * inf = NaN for
#: the zeros) and ``absmax / qmax`` would be subnormal (flushed to 0 by some compilers)
TINY = 2.0**-119


def check_args(bits: int, block: int) -> None:
    if bits not in QMAX:
        raise ValueError(f"quantizer: bits must be 8 or 4, got {bits!r}")
    if block < 2 or block & (block - 1) or block > 65536:
        raise ValueError(f"quantizer: block must be a power of two in [2, 65536], got {block!r}")


def code_numel(n: int, bits: int) -> int:
    """Bytes of codes for a row of ``n`` values."""
    return n if bits == 8 else (n + 1) // 2


def num_blocks(n: int, block: int) -> int:
    return max(1, -(-n // block))


def check_out(
    out: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> None:
    """``dequantize(out=...)``: the values' shape (or any shape of as many elements), dtype and
    device."""
    if out.numel() != math.prod(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(
            f"dequantize: out is {tuple(out.shape)} {out.dtype} on {out.device}; the values are "
            f"{tuple(shape)} {dtype} on {device}: pass a tensor of that many elements, dtype "
            "and device, or no out"
        )


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], int]:
    n = x.shape[-1] if x.dim() else 1
    lead = tuple(x.shape[:-1]) if x.dim() else ()
    return x.reshape(-1, n), lead, n


def _scale_and_inverse(absmax: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``absmax / qmax`` and ``qmax / absmax``, correctly rounded fp32 quotients on every
    device; both 0 for a block below ``TINY`` (all-zero ones included); a NaN absmax gives a
    NaN scale and an infinite one an infinite scale, with ``inv`` 0. Both divisors are tensors
    on purpose: torch computes ``number / tensor`` as ``tensor.reciprocal() * number`` (two
    roundings), and on CUDA ``tensor / number`` as a product with the number's rounded
    reciprocal."""
    q = torch.full_like(absmax, float(qmax))
    small = absmax < TINY  # False for NaN: its scale stays NaN
    usable = absmax >= TINY  # finite or infinite, not NaN
    inv = torch.where(usable, q / torch.where(usable, absmax, torch.ones_like(absmax)), 0.0)
    return torch.where(small, 0.0, absmax / q), inv


class TorchQuantizer(OpImpl):
    """Pure-PyTorch implementation (any device), the reference for the kernels."""

    backend = Backend.FALLBACK

    @torch.no_grad()
    def quantize(
        self, x: torch.Tensor, bits: int = 8, block: int = DEFAULT_BLOCK
    ) -> tuple[torch.Tensor, torch.Tensor]:
        check_args(bits, block)
        rows, lead, n = _rows(x)
        nb = num_blocks(n, block)
        xf = rows.float()
        if nb * block != n:
            xf = torch.nn.functional.pad(xf, (0, nb * block - n))
        xb = xf.view(rows.shape[0], nb, block)
        qmax = QMAX[bits]
        absmax = xb.abs().amax(dim=-1)
        scales, inv = _scale_and_inverse(absmax, qmax)
        y = xb * inv.unsqueeze(-1)  # rounded to fp32 here, and the sum below again: no fma
        q = torch.floor(y + 0.5).clamp_(-qmax, qmax).to(torch.int8)
        q = q.view(rows.shape[0], nb * block)
        if bits == 8:
            codes = q[:, :n]
        else:
            u = (q & 0xF).to(torch.uint8)  # two's complement nibble
            packed = u[:, 0::2] | (u[:, 1::2] << 4)
            codes = packed[:, : code_numel(n, 4)]
        return codes.reshape(*lead, codes.shape[-1]).contiguous(), scales.reshape(*lead, nb)

    @torch.no_grad()
    def dequantize(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        bits: int = 8,
        block: int = DEFAULT_BLOCK,
        n: int | None = None,
        dtype: torch.dtype = torch.float32,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        check_args(bits, block)
        crow, lead, c = _rows(codes)
        nb = scales.shape[-1]
        n = (c if bits == 8 else 2 * c) if n is None else n
        if code_numel(n, bits) != c or num_blocks(n, block) != nb:
            raise ValueError(
                f"dequantize: {c} code bytes and {nb} scales per row do not describe {n} values "
                f"at bits={bits}, block={block}"
            )
        if bits == 8:
            q = crow.to(torch.int8).float()
        else:
            b = crow.to(torch.uint8).to(torch.int16)
            lo = ((b & 0xF) ^ 8) - 8  # sign-extend the nibble
            hi = ((b >> 4) ^ 8) - 8
            q = torch.stack((lo, hi), dim=-1).reshape(crow.shape[0], 2 * c)[:, :n].float()
        if nb * block != n:
            q = torch.nn.functional.pad(q, (0, nb * block - n))
        vals = q.view(crow.shape[0], nb, block) * scales.reshape(-1, nb, 1).float()
        vals = vals.reshape(crow.shape[0], nb * block)[:, :n].to(dtype)
        if out is not None:
            check_out(out, (*lead, n), dtype, codes.device)
            return out.copy_(vals.reshape(out.shape))
        return vals.contiguous().reshape(*lead, n)


class TritonQuantizer(TorchQuantizer):
    """Triton kernels on CUDA tensors (one program per tile of blocks); the fallback elsewhere.

    Holds the kernels' launch state (``_quant_triton.QuantizerKernels``: launch plans and
    compiled kernels), created at the first CUDA call: the host time per call is part of what
    qwZ and qgZ pay per bucket."""

    backend = Backend.TRITON

    def __init__(self, direct: bool | None = None) -> None:
        self._direct = direct  # QuantizerKernels' ``direct``: None where supported
        self._kernels = None

    def kernels(self):
        """The ``QuantizerKernels`` this op launches with (created on first use)."""
        if self._kernels is None:
            from ds_kernels._quant_triton import QuantizerKernels

            self._kernels = QuantizerKernels(self._direct)
        return self._kernels

    def quantize(
        self, x: torch.Tensor, bits: int = 8, block: int = DEFAULT_BLOCK
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if (
            not x.is_cuda or x.dtype not in (torch.float32, torch.float16, torch.bfloat16)
            or not x.numel()
        ):  # fmt: skip
            return super().quantize(x, bits, block)
        check_args(bits, block)
        return self.kernels().quantize(x.contiguous(), bits, block)

    def dequantize(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        bits: int = 8,
        block: int = DEFAULT_BLOCK,
        n: int | None = None,
        dtype: torch.dtype = torch.float32,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if (
            not codes.is_cuda or dtype not in (torch.float32, torch.float16, torch.bfloat16)
            or not codes.numel()
        ):  # fmt: skip
            return super().dequantize(codes, scales, bits, block, n, dtype, out)
        check_args(bits, block)
        c = codes.shape[-1] if codes.dim() else 1
        nb = scales.shape[-1] if scales.dim() else 1
        n = (c if bits == 8 else 2 * c) if n is None else n
        if (
            code_numel(n, bits) != c or num_blocks(n, block) != nb
            or scales.numel() * c != codes.numel() * nb
        ):  # fmt: skip
            raise ValueError(
                f"dequantize: {c} code bytes and {nb} scales per row do not describe {n} values "
                f"at bits={bits}, block={block}, or codes {tuple(codes.shape)} and scales "
                f"{tuple(scales.shape)} hold different numbers of rows"
            )
        if scales.dtype != torch.float32 or not scales.is_contiguous():
            scales = scales.float().contiguous()
        target = None
        if out is not None:
            check_out(out, (*codes.shape[:-1], n), dtype, codes.device)
            target = out if out.is_contiguous() else None
        vals = self.kernels().dequantize(codes.contiguous(), scales, bits, block, n, dtype, target)
        if out is None or target is not None:
            return vals if out is None else out
        return out.copy_(vals.reshape(out.shape))
