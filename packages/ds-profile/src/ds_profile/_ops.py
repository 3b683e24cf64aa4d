"""FLOP and MAC formulas per ATen operator.

Counting happens at the ATen level (under a TorchDispatchMode, see ``_counter.py``) because that
is the one place every way of writing a product meets: ``nn.Linear``, ``F.linear``, ``@``,
``Tensor.matmul``, ``torch.einsum`` and ``bmm`` all arrive here as ``mm``/``addmm``/``bmm`` with
their real (broadcast, permuted) shapes, and the autograd engine's backward kernels arrive here
too. Composite operators (``linear``, ``matmul``, ``einsum``) never reach a dispatch mode: they
are seen as the kernels they decompose into, so nothing is counted twice.

Conventions (DeepSpeed's where it has one):

* a product-class op (mm, bmm, conv, attention) costs ``2 * MACs`` FLOPs;
* a convolution's (and transposed convolution's) bias adds one FLOP per output element
  (out_channels x output positions), as DeepSpeed counts it;
* the bias addition of ``addmm``/``baddbmm`` is not counted: ``nn.Linear``/``F.linear`` arrive
  here as ``addmm``, and DeepSpeed does not count a linear layer's bias (its ``F.linear``
  formula is ``2 * MACs``), so a linear layer costs the same with or without its bias. (A
  direct ``torch.addmm``/``torch.baddbmm`` call, which DeepSpeed charges ``numel(input)``
  more, cannot be told apart from ``F.linear`` at the ATen level.)
* norms, activations and softmax cost FLOPs per element with DeepSpeed's factors (layer/group
  norm 5 per element with an affine weight, 4 without; batch norm 5/4 when training, 2/1 in
  eval; softmax and activations 1) and no MACs; embeddings cost nothing (a lookup);
* fused attention adds its softmax (one per score, as the math backend's separate softmax
  kernel is counted);
* causal attention counts only the (query, key) pairs the mask keeps: with torch's top-left
  alignment that is ``sum(min(i + 1, Lk) for i in range(Lq))`` pairs, about half the square;
* backward kernels are counted from their own shapes: the weight and input gradients of a
  product are one product each (2x the forward in all), attention backward is 2x its forward
  (dQ, dK, dV and dP), element-wise backward kernels 2x their forward per-element cost.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

aten = torch.ops.aten

#: (flops, macs) of one call from its bound arguments and outputs
Formula = Callable[[dict[str, Any], Any], tuple[int, int]]


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)


def _mm(a: dict[str, Any], out: Any) -> tuple[int, int]:
    m, k = a["self"].shape
    n = a["mat2"].shape[-1]
    macs = m * k * n
    return 2 * macs, macs


def _addmm(a: dict[str, Any], out: Any) -> tuple[int, int]:
    m, k = a["mat1"].shape
    macs = m * k * a["mat2"].shape[-1]
    return 2 * macs, macs


def _bmm(a: dict[str, Any], out: Any) -> tuple[int, int]:
    b, m, k = a["self"].shape
    macs = b * m * k * a["mat2"].shape[-1]
    return 2 * macs, macs


def _baddbmm(a: dict[str, Any], out: Any) -> tuple[int, int]:
    b, m, k = a["batch1"].shape
    macs = b * m * k * a["batch2"].shape[-1]
    return 2 * macs, macs


def _mv(a: dict[str, Any], out: Any) -> tuple[int, int]:
    macs = _numel(a["mat"].shape if "mat" in a else a["self"].shape)
    return 2 * macs, macs


def _dot(a: dict[str, Any], out: Any) -> tuple[int, int]:
    macs = a["self"].numel()
    return 2 * macs, macs


def _conv_macs(x_shape: Sequence[int], w_shape: Sequence[int], out_shape: Sequence[int],
               transposed: bool) -> int:  # fmt: skip
    """MACs of a convolution: every output position of every filter reads a kernel window of
    every input channel of its group. A transposed convolution is the gradient of a forward
    one, so its cost is counted over the input positions instead."""
    kernel = _numel(w_shape[2:])
    if transposed:
        # weight is [C_in, C_out / groups, *k]: each input position scatters into C_out/groups
        return int(x_shape[0]) * _numel(x_shape[2:]) * int(x_shape[1]) * int(w_shape[1]) * kernel
    # weight is [C_out, C_in / groups, *k]
    return int(out_shape[0]) * _numel(out_shape[2:]) * int(w_shape[0]) * int(w_shape[1]) * kernel


def _convolution(a: dict[str, Any], out: Any) -> tuple[int, int]:
    macs = _conv_macs(a["input"].shape, a["weight"].shape, out.shape, bool(a["transposed"]))
    # the bias add: one FLOP per output element (out_channels x output positions x batch)
    bias = out.numel() if a.get("bias") is not None else 0
    return 2 * macs + bias, macs


def _convolution_backward(a: dict[str, Any], out: Any) -> tuple[int, int]:
    grad_out, x, w = a["grad_output"], a["input"], a["weight"]
    transposed = bool(a["transposed"])
    fwd = _conv_macs(x.shape, w.shape, grad_out.shape, transposed)
    mask = a["output_mask"]
    macs = fwd * (int(bool(mask[0])) + int(bool(mask[1])))
    return 2 * macs, macs


def attention_pairs(lq: int, lk: int, causal: bool) -> int:
    """(query, key) pairs attention computes: all of them, or the causal (top-left) triangle."""
    if not causal:
        return lq * lk
    full = min(lq, lk)  # rows 0..full-1 keep i+1 keys, the rest keep all lk
    return full * (full + 1) // 2 + max(0, lq - lk) * lk


def _sdpa_macs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> int:
    # [..., L, E] x [..., S, E] -> scores, then scores x [..., S, Ev]
    batch = _numel(q.shape[:-2])
    pairs = attention_pairs(int(q.shape[-2]), int(k.shape[-2]), causal)
    return batch * pairs * (int(q.shape[-1]) + int(v.shape[-1]))


def _sdpa(a: dict[str, Any], out: Any) -> tuple[int, int]:
    q, k = a["query"], a["key"]
    causal = bool(a.get("is_causal", False))
    macs = _sdpa_macs(q, k, a["value"], causal)
    # + the softmax, one per kept score, as when the math backend runs it as its own kernel
    scores = _numel(q.shape[:-2]) * attention_pairs(int(q.shape[-2]), int(k.shape[-2]), causal)
    return 2 * macs + scores, macs


def _sdpa_backward(a: dict[str, Any], out: Any) -> tuple[int, int]:
    q, k = a["query"], a["key"]
    causal = bool(a.get("is_causal", False))
    macs = 2 * _sdpa_macs(q, k, a["value"], causal)
    scores = _numel(q.shape[:-2]) * attention_pairs(int(q.shape[-2]), int(k.shape[-2]), causal)
    return 2 * macs + 2 * scores, macs


def _per_element(factor: int) -> Formula:
    def formula(a: dict[str, Any], out: Any) -> tuple[int, int]:
        first = next(v for v in a.values() if isinstance(v, torch.Tensor))
        return factor * first.numel(), 0

    return formula


def _affine_norm(weight_key: str, with_w: int, without_w: int, backward: bool = False) -> Formula:
    def formula(a: dict[str, Any], out: Any) -> tuple[int, int]:
        x = a["input"]
        per = with_w if a.get(weight_key) is not None else without_w
        return (2 if backward else 1) * per * x.numel(), 0

    return formula


def _batch_norm(a: dict[str, Any], out: Any) -> tuple[int, int]:
    affine = a.get("weight") is not None
    training = bool(a.get("training", False))
    per = (5 if affine else 4) if training else (2 if affine else 1)
    return per * a["input"].numel(), 0


def _batch_norm_backward(a: dict[str, Any], out: Any) -> tuple[int, int]:
    x = a.get("input", a.get("self"))
    return 2 * (5 if a.get("weight") is not None else 4) * x.numel(), 0


def _zero(a: dict[str, Any], out: Any) -> tuple[int, int]:
    return 0, 0


def _ops(*names: str) -> list[Any]:
    """The overload packets that exist in this torch build (older builds lack a few)."""
    return [getattr(aten, n) for n in names if hasattr(aten, n)]


def _table() -> dict[Any, Formula]:
    t: dict[Any, Formula] = {}

    def put(packets: list[Any], f: Formula) -> None:
        for p in packets:
            t[p] = f

    put(_ops("mm"), _mm)
    put(_ops("addmm", "_addmm_activation"), _addmm)
    put(_ops("bmm"), _bmm)
    put(_ops("baddbmm"), _baddbmm)
    put(_ops("mv", "addmv"), _mv)
    put(_ops("dot", "vdot"), _dot)
    put(
        _ops("convolution", "_convolution", "cudnn_convolution", "mkldnn_convolution"), _convolution
    )
    put(_ops("convolution_backward"), _convolution_backward)
    put(_ops("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_fused_attention_overrideable"), _sdpa)  # fmt: skip
    put(_ops("_scaled_dot_product_flash_attention_for_cpu_backward",
             "_scaled_dot_product_flash_attention_backward",
             "_scaled_dot_product_efficient_attention_backward",
             "_scaled_dot_product_cudnn_attention_backward",
             "_scaled_dot_product_fused_attention_overrideable_backward"), _sdpa_backward)  # fmt: skip
    put(_ops("native_layer_norm"), _affine_norm("weight", 5, 4))
    put(_ops("native_layer_norm_backward"), _affine_norm("weight", 5, 4, backward=True))
    put(_ops("native_group_norm"), _affine_norm("weight", 5, 4))
    put(_ops("native_group_norm_backward"), _per_element(2 * 5))
    # RMSNorm: no mean subtraction, so one operation per element fewer than LayerNorm
    put(_ops("_fused_rms_norm"), _affine_norm("weight", 4, 3))
    put(_ops("_fused_rms_norm_backward"), _affine_norm("weight", 4, 3, backward=True))
    put(_ops("native_batch_norm", "_native_batch_norm_legit"), _batch_norm)
    put(_ops("_native_batch_norm_legit_no_training"), _per_element(2))
    put(_ops("native_batch_norm_backward"), _batch_norm_backward)
    put(_ops("relu", "relu_", "gelu", "gelu_", "silu", "silu_", "elu", "elu_", "leaky_relu",
             "leaky_relu_", "hardtanh", "hardtanh_", "_prelu_kernel", "sigmoid", "tanh",
             "hardswish", "mish", "_softmax", "_log_softmax", "_safe_softmax"), _per_element(1))  # fmt: skip
    put(_ops("threshold_backward", "gelu_backward", "silu_backward", "elu_backward",
             "leaky_relu_backward", "hardtanh_backward", "_prelu_kernel_backward",
             "sigmoid_backward", "tanh_backward", "hardswish_backward", "mish_backward",
             "_softmax_backward_data", "_log_softmax_backward_data"), _per_element(2))  # fmt: skip
    put(_ops("embedding", "embedding_dense_backward", "_embedding_bag"), _zero)
    return t


#: product-class operators: the ones MFU is about, and the ones the README's tables compare
MATMUL_CLASS = frozenset(
    _ops(
        "mm",
        "addmm",
        "_addmm_activation",
        "bmm",
        "baddbmm",
        "mv",
        "addmv",
        "dot",
        "vdot",
        "convolution",
        "_convolution",
        "cudnn_convolution",
        "mkldnn_convolution",
        "convolution_backward",
    )  # fmt: skip
)


def bind(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Arguments of an ATen call by schema name, defaults filled in."""
    bound: dict[str, Any] = {}
    for i, arg in enumerate(func._schema.arguments):
        if i < len(args) and not arg.kwarg_only:
            bound[arg.name] = args[i]
        elif arg.name in kwargs:
            bound[arg.name] = kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
    return bound


FORMULAS: dict[Any, Formula] = _table()
