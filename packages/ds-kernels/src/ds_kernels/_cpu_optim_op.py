"""The ``cpu_optim`` op: Adam/AdamW, Adagrad and Lion steps over lists of fp32 CPU tensors.

Two implementations with one interface:
- `CompiledCpuOptim` calls the C++ library (csrc/cpu_optim.cpp) through ctypes: one fused
  pass over memory, OpenMP threads, SIMD, optional bf16/fp16 copy of the result.
- `TorchCpuOptim` is the pure-PyTorch fallback, written in torch.optim's order of operations
  so that it reproduces torch.optim's numbers.

Params and states are fp32; gradients may be fp32, bf16 or fp16 (per tensor). The step is
the fp32 step on the exactly widened gradient (`grad.float()`): the compiled op widens 16-bit
gradients in registers/L1 inside its one pass, so they are read from memory at 2 bytes.

The optimizers validate and group tensors; the op checks what the C code relies on (CPU,
dtype, contiguous, matching sizes) so that a bad call raises instead of corrupting memory.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path

import torch

from ds_kernels._registry import Backend, OpImpl

_OUT_KINDS = {torch.bfloat16: 1, torch.float16: 2}
# csrc/cpu_optim.cpp's GradKind
GRAD_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
Tensors = Sequence[torch.Tensor]


def _check_list(
    name: str,
    tensors: Tensors,
    params: Tensors,
    dtype: torch.dtype | tuple[torch.dtype, ...] | None,
) -> None:
    if len(tensors) != len(params):
        raise ValueError(f"cpu_optim: {name} has {len(tensors)} tensors for {len(params)} params")
    allowed = (dtype,) if isinstance(dtype, torch.dtype) else dtype
    for i, (t, p) in enumerate(zip(tensors, params)):
        if t.device.type != "cpu":
            raise ValueError(
                f"cpu_optim: {name}[{i}] is on {t.device}; CPU optimizers need CPU tensors"
            )
        if allowed is not None and t.dtype not in allowed:
            expected = " or ".join(str(d) for d in allowed)
            raise ValueError(f"cpu_optim: {name}[{i}] is {t.dtype}, expected {expected}")
        if not t.is_contiguous():
            raise ValueError(f"cpu_optim: {name}[{i}] is not contiguous; call .contiguous() first")
        if t.numel() != p.numel():
            raise ValueError(
                f"cpu_optim: {name}[{i}] has {t.numel()} elements, its param has {p.numel()}"
            )


def _check_outs(outs: Tensors | None, params: Tensors) -> int:
    if outs is None:
        return 0
    if not outs:
        return 0
    dtype = outs[0].dtype
    if dtype not in _OUT_KINDS:
        raise ValueError(
            f"cpu_optim: low-precision outputs must be bfloat16 or float16, not {dtype}"
        )
    _check_list("low_precision_out", outs, params, dtype)
    return _OUT_KINDS[dtype]


def _widened(grads: Tensors) -> list[torch.Tensor]:
    """The fallback's fp32 gradients (the compiled op widens inside its pass instead)."""
    for i, g in enumerate(grads):
        if g.dtype not in GRAD_KINDS:
            raise ValueError(
                f"cpu_optim: grads[{i}] is {g.dtype}, expected float32, bfloat16 or float16"
            )
    return [g if g.dtype == torch.float32 else g.float() for g in grads]


class TorchCpuOptim(OpImpl):
    """Pure-PyTorch implementation; the reference the compiled op is tested against."""

    backend = Backend.FALLBACK

    def adam(
        self,
        params: Tensors,
        grads: Tensors,
        exp_avgs: Tensors,
        exp_avg_sqs: Tensors,
        outs: Tensors | None,
        *,
        lr: float,
        beta1: float,
        beta2: float,
        eps: float,
        weight_decay: float,
        decoupled: bool,
        bias_correction1: Sequence[float],
        bias_correction2_sqrt: Sequence[float],
        num_threads: int = 0,
        grad_scale: float = 1.0,
    ) -> None:
        _check_outs(outs, params)
        for i, (p, g, m, v) in enumerate(zip(params, _widened(grads), exp_avgs, exp_avg_sqs)):
            if grad_scale != 1.0:
                g = g * grad_scale  # the caller's gradient stays as it is, as in the library
            if decoupled:
                p.mul_(1 - lr * weight_decay)
            elif weight_decay != 0:
                g = g.add(p, alpha=weight_decay)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / bias_correction2_sqrt[i]).add_(eps)
            p.addcdiv_(m, denom, value=-(lr / bias_correction1[i]))
            if outs:
                outs[i].copy_(p.view_as(outs[i]))

    def adagrad(
        self,
        params: Tensors,
        grads: Tensors,
        sums: Tensors,
        outs: Tensors | None,
        *,
        neg_clr: Sequence[float],
        eps: float,
        weight_decay: float,
        num_threads: int = 0,
    ) -> None:
        _check_outs(outs, params)
        for i, (p, g, s) in enumerate(zip(params, _widened(grads), sums)):
            if weight_decay != 0:
                g = g.add(p, alpha=weight_decay)
            s.addcmul_(g, g, value=1)
            std = s.sqrt().add_(eps)
            p.addcdiv_(g, std, value=neg_clr[i])
            if outs:
                outs[i].copy_(p.view_as(outs[i]))

    def lion(
        self,
        params: Tensors,
        grads: Tensors,
        exp_avgs: Tensors,
        outs: Tensors | None,
        *,
        lr: float,
        beta1: float,
        beta2: float,
        weight_decay: float,
        num_threads: int = 0,
    ) -> None:
        _check_outs(outs, params)
        for i, (p, g, m) in enumerate(zip(params, _widened(grads), exp_avgs)):
            p.mul_(1 - lr * weight_decay)
            update = (m * beta1).add_(g, alpha=1 - beta1).sign_()
            p.add_(update, alpha=-lr)
            m.mul_(beta2).add_(g, alpha=1 - beta2)
            if outs:
                outs[i].copy_(p.view_as(outs[i]))


def _ptrs(tensors: Tensors) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def _grad_kinds(grads: Tensors) -> ctypes.Array:
    return (ctypes.c_int32 * len(grads))(*[GRAD_KINDS[g.dtype] for g in grads])


def _doubles(values: Sequence[float]) -> ctypes.Array:
    return (ctypes.c_double * len(values))(*values)


class CompiledCpuOptim(OpImpl):
    """ctypes binding of the compiled library. ctypes releases the GIL during each call, so
    an offload engine can run the step on a side thread while Python keeps going."""

    def __init__(self, library: Path) -> None:
        self.library = library
        lib = ctypes.CDLL(str(library))
        vp, i32, dbl = ctypes.c_void_p, ctypes.c_int32, ctypes.c_double
        pp = ctypes.POINTER(ctypes.c_void_p)
        i64p = ctypes.POINTER(ctypes.c_int64)
        i32p = ctypes.POINTER(ctypes.c_int32)
        dblp = ctypes.POINTER(ctypes.c_double)
        lib.ds_cpu_optim_isa.restype = ctypes.c_char_p
        lib.ds_cpu_optim_has_openmp.restype = ctypes.c_int
        lib.ds_adam_step.restype = ctypes.c_int
        # n, params, grads, grad kinds, exp_avgs, exp_avg_sqs, outs, out kind, numels,
        # bias corrections (2), lr, beta1, beta2, eps, weight_decay, decoupled, threads, scale
        lib.ds_adam_step.argtypes = [
            i32,
            pp,
            pp,
            i32p,
            pp,
            pp,
            vp,
            i32,
            i64p,
            dblp,
            dblp,
            dbl,
            dbl,
            dbl,
            dbl,
            dbl,
            i32,
            i32,
            dbl,
        ]
        lib.ds_adagrad_step.restype = ctypes.c_int
        lib.ds_adagrad_step.argtypes = [i32, pp, pp, i32p, pp, vp, i32, i64p, dblp, dbl, dbl, i32]
        lib.ds_lion_step.restype = ctypes.c_int
        lib.ds_lion_step.argtypes = [
            i32, pp, pp, i32p, pp, vp, i32, i64p, dbl, dbl, dbl, dbl, i32,
        ]  # fmt: skip
        self._lib = lib
        self.isa: str = lib.ds_cpu_optim_isa().decode()
        self.openmp: bool = bool(lib.ds_cpu_optim_has_openmp())

    def _common(
        self, params: Tensors, grads: Tensors, states: dict[str, Tensors], outs: Tensors | None
    ):
        _check_list("params", params, params, torch.float32)
        _check_list("grads", grads, params, tuple(GRAD_KINDS))
        for name, ts in states.items():
            _check_list(name, ts, params, torch.float32)
        kind = _check_outs(outs, params)
        numel = (ctypes.c_int64 * len(params))(*[p.numel() for p in params])
        out_arr = _ptrs(outs) if kind else None
        return kind, numel, out_arr

    @staticmethod
    def _threads(num_threads: int) -> int:
        return num_threads if num_threads > 0 else torch.get_num_threads()

    def adam(
        self,
        params: Tensors,
        grads: Tensors,
        exp_avgs: Tensors,
        exp_avg_sqs: Tensors,
        outs: Tensors | None,
        *,
        lr: float,
        beta1: float,
        beta2: float,
        eps: float,
        weight_decay: float,
        decoupled: bool,
        bias_correction1: Sequence[float],
        bias_correction2_sqrt: Sequence[float],
        num_threads: int = 0,
        grad_scale: float = 1.0,
    ) -> None:
        if not params:
            return
        kind, numel, out_arr = self._common(
            params, grads, {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}, outs
        )
        rc = self._lib.ds_adam_step(
            len(params), _ptrs(params), _ptrs(grads), _grad_kinds(grads), _ptrs(exp_avgs),
            _ptrs(exp_avg_sqs), out_arr, kind, numel, _doubles(bias_correction1), _doubles(bias_correction2_sqrt),
            lr, beta1, beta2, eps, weight_decay, int(decoupled), self._threads(num_threads),
            float(grad_scale),
        )  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"cpu_optim: ds_adam_step returned {rc}")

    def adagrad(
        self,
        params: Tensors,
        grads: Tensors,
        sums: Tensors,
        outs: Tensors | None,
        *,
        neg_clr: Sequence[float],
        eps: float,
        weight_decay: float,
        num_threads: int = 0,
    ) -> None:
        if not params:
            return
        kind, numel, out_arr = self._common(params, grads, {"sums": sums}, outs)
        rc = self._lib.ds_adagrad_step(
            len(params), _ptrs(params), _ptrs(grads), _grad_kinds(grads), _ptrs(sums), out_arr,
            kind, numel,
            _doubles(neg_clr), eps, weight_decay, self._threads(num_threads),
        )  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"cpu_optim: ds_adagrad_step returned {rc}")

    def lion(
        self,
        params: Tensors,
        grads: Tensors,
        exp_avgs: Tensors,
        outs: Tensors | None,
        *,
        lr: float,
        beta1: float,
        beta2: float,
        weight_decay: float,
        num_threads: int = 0,
    ) -> None:
        if not params:
            return
        kind, numel, out_arr = self._common(params, grads, {"exp_avgs": exp_avgs}, outs)
        rc = self._lib.ds_lion_step(
            len(params), _ptrs(params), _ptrs(grads), _grad_kinds(grads), _ptrs(exp_avgs),
            out_arr, kind, numel,
            lr, beta1, beta2, weight_decay, self._threads(num_threads),
        )  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"cpu_optim: ds_lion_step returned {rc}")
