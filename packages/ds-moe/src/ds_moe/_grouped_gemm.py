"""Grouped GEMM over tokens sorted by expert: ``torch._grouped_mm`` where it works, else a loop.

``torch._grouped_mm(a [T, K], b [G, K, N], offs)`` multiplies the rows of group g (ending at
``offs[g]``) by ``b[g]`` in one kernel; it is private API, so availability is probed once per
(device type, dtype) with a tiny problem, including its backward, and anything that fails
falls back to a per-expert loop of ``F.linear`` (same numbers, more kernel launches).
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _probe(device_type: str, device_index: int | None, dtype: torch.dtype) -> bool:
    if getattr(torch, "_grouped_mm", None) is None:
        return False
    fn = _grouped_mm_fn()
    device = torch.device(device_type, device_index) if device_index is not None else device_type
    try:
        a = torch.randn(40, 16, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(3, 8, 16, device=device, dtype=dtype, requires_grad=True)
        # an empty group and rows past the last group, as the layer runs it
        offs = torch.tensor([16, 16, 32], device=device, dtype=torch.int32)
        out = fn(a, w.transpose(-2, -1), offs=offs)
        out.backward(torch.ones_like(out))
        ref = torch.cat([a[:16] @ w[0].t(), a[16:32] @ w[2].t()])
        # the per-group sum of the bias gradient (column-major ones x row-major rows)
        sums = fn(torch.ones(40, 8, device=device, dtype=dtype).t(), out.detach(), offs=offs)
        ref_sums = torch.stack([ref[:16].sum(0), torch.zeros_like(ref[0]), ref[16:].sum(0)])
        return bool(
            torch.allclose(out[:32].float(), ref.float(), atol=1e-1, rtol=5e-2)
            and torch.allclose(sums[:, 0].float(), ref_sums.float(), atol=1.0, rtol=5e-2)
        )
    except Exception:  # noqa: BLE001 - any failure means "use the loop"
        return False


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """True where ``torch._grouped_mm`` runs forward and backward for this device and dtype."""
    return _probe(device.type, device.index, dtype)


def row_alignment(device: torch.device) -> int:
    """Rows per group are a multiple of this: 1, the kernels take any group size.

    The 2d x 3d product (forward and input gradient) and the weight gradient (a column-major
    x row-major 2d x 2d product) have no alignment rule on the grouped dimension and accept
    empty groups, so groups are never padded.
    """
    return 1


def _grouped_mm_fn():
    # torch.nn.functional.grouped_mm is the public name in newer releases; same kernel
    import torch.nn.functional as F

    return getattr(F, "grouped_mm", None) or torch._grouped_mm


def group_onehot(offs: torch.Tensor, num_rows: int, dtype: torch.dtype) -> torch.Tensor:
    """[rows, G] 0/1 matrix: row r belongs to group g (rows past the last group: all zero).

    Built on the device from the group ends, so a bias can be added per group with one GEMM
    (``y.addmm_(onehot, bias)``) and summed per group in the backward without host sizes.
    """
    rows = torch.arange(num_rows, device=offs.device, dtype=offs.dtype)
    group = torch.searchsorted(offs, rows, right=True)
    ids = torch.arange(offs.numel(), device=offs.device, dtype=group.dtype)
    return (group.unsqueeze(1) == ids).to(dtype)


def grouped_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    offs: torch.Tensor | None,
    group_sizes: list[int] | None = None,
    onehot: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y[rows of g] = x[rows of g] @ weight[g].T + bias[g]`` for ``weight`` [G, out, in].

    With ``offs`` (int32 group ends on x's device; rows after the last end are left
    undefined) one grouped kernel runs, and the bias goes in by one in-place GEMM with
    ``onehot`` (see ``group_onehot``); without, a loop over ``group_sizes`` (host ints).
    """
    if offs is not None:
        y = _grouped_mm_fn()(x, weight.transpose(-2, -1), offs=offs)
        if bias is not None:
            assert onehot is not None
            y = _GroupBias.apply(y, bias, offs, onehot)
        return _ContiguousGrad.apply(y)
    assert group_sizes is not None
    # GEMM then bias add, rounded twice as on the grouped path (not F.linear's fused bias)
    parts = [seg @ weight[g].t() for g, seg in enumerate(x.split(group_sizes))]
    if bias is not None:
        parts = [p + bias[g] for g, p in enumerate(parts)]
    return torch.cat(parts) if parts else x.new_zeros(0, weight.shape[1])


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


class _GroupBias(torch.autograd.Function):
    """``y[rows of g] += bias[g]`` in one GEMM; the backward sums the gradient per group.

    The per-group sum is itself a grouped product (ones^T @ grad over each group's rows), so
    it reads only the groups' rows: rows after ``offs[-1]`` hold undefined values (the grouped
    kernels leave them unwritten) and must not reach the bias gradient, even times zero.
    """

    @staticmethod
    def forward(ctx, y, bias, offs, onehot):
        ctx.save_for_backward(offs)
        y.addmm_(onehot, bias)  # the GEMM's output is not needed again: add in place
        ctx.mark_dirty(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (offs,) = ctx.saved_tensors
        grad = grad.contiguous()
        # 8 identical ones rows: a column-major operand with a 16-byte leading dimension
        ones = grad.new_ones(grad.shape[0], 8).t()
        sums = _grouped_mm_fn()(ones, grad, offs=offs)  # [G, 8, out]
        return grad, sums[:, 0].contiguous(), None, None
