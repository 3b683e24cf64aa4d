"""Grouped GEMM over tokens sorted by expert: ``torch._grouped_mm`` where it works, else a loop.

``torch._grouped_mm(a [T, K], b [G, K, N], offs)`` multiplies the rows of group g (ending at
``offs[g]``) by ``b[g]`` in one kernel; it is private API, so availability is probed once per
(device type, dtype) with a tiny problem, including its backward, and anything that fails
falls back to a per-expert loop of ``F.linear`` (same numbers, more kernel launches).
"""

from __future__ import annotations

import functools

import torch

#: rows per group are padded to this on CUDA: the CUTLASS kernels behind _grouped_mm want
#: 16-byte aligned group starts and misbehave on empty groups in some releases (torchtitan
#: pads to 8 for bf16; 16 also covers fp8-sized types)
CUDA_ROW_ALIGN = 16


@functools.cache
def _probe(device_type: str, device_index: int | None, dtype: torch.dtype) -> bool:
    fn = getattr(torch, "_grouped_mm", None)
    if fn is None:
        return False
    device = torch.device(device_type, device_index) if device_index is not None else device_type
    try:
        a = torch.randn(32, 16, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(2, 8, 16, device=device, dtype=dtype, requires_grad=True)
        offs = torch.tensor([16, 32], device=device, dtype=torch.int32)
        out = fn(a, w.transpose(-2, -1), offs=offs)
        out.backward(torch.ones_like(out))
        ref = torch.cat([a[:16] @ w[0].t(), a[16:] @ w[1].t()])
        return bool(torch.allclose(out.float(), ref.float(), atol=1e-1, rtol=5e-2))
    except Exception:  # noqa: BLE001 - any failure means "use the loop"
        return False


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """True where ``torch._grouped_mm`` runs forward and backward for this device and dtype."""
    return _probe(device.type, device.index, dtype)


def row_alignment(device: torch.device) -> int:
    return CUDA_ROW_ALIGN if device.type == "cuda" else 1


def grouped_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    group_sizes: list[int],
    offs: torch.Tensor | None,
) -> torch.Tensor:
    """``y[rows of g] = x[rows of g] @ weight[g].T + bias[g]`` for ``weight`` [G, out, in].

    ``offs`` (int32 cumulative group ends on x's device) selects the grouped kernel; None
    runs the loop.
    """
    if offs is not None:
        y = torch._grouped_mm(x, weight.transpose(-2, -1), offs=offs)
    else:
        parts = [seg @ weight[g].t() for g, seg in enumerate(x.split(group_sizes))]
        y = torch.cat(parts) if parts else x.new_zeros(0, weight.shape[1])
    if bias is not None:
        return _SegmentBias.apply(y, bias, group_sizes)
    return _ContiguousGrad.apply(y) if offs is not None else y


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient dense.

    _grouped_mm's backward rejects gradients with zero strides (what ``y.sum().backward()``
    or an expand produces); a no-op when the gradient is already contiguous.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class _SegmentBias(torch.autograd.Function):
    """Adds ``bias[g]`` to the rows of group g in place (the GEMM output is not needed again).

    Avoids materialising a [T, out] gathered bias; the backward sums the gradient per group.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, bias: torch.Tensor, group_sizes: list[int]) -> torch.Tensor:
        ctx.group_sizes = group_sizes
        for g, seg in enumerate(y.split(group_sizes)):
            if seg.shape[0]:
                seg.add_(bias[g])
        ctx.mark_dirty(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # dense: the GEMM's backward (_grouped_mm) rejects zero-stride gradients
        grad = grad.contiguous()
        parts = [seg.sum(0) for seg in grad.split(ctx.group_sizes)]
        return grad, torch.stack(parts), None


def add_segment_bias(y: torch.Tensor, bias: torch.Tensor, group_sizes: list[int]) -> torch.Tensor:
    return _SegmentBias.apply(y, bias, group_sizes)
