"""CPUAdam, CPUAdagrad, CPULion: torch.optim.Optimizer subclasses over the `cpu_optim` op.

State layout and param-group keys are torch.optim's (Adam/AdamW: exp_avg, exp_avg_sq, step;
Adagrad: sum, step; Lion: exp_avg, step), so `torch.optim.AdamW().load_state_dict(
CPUAdam(...).state_dict())` works and back.

`step(low_precision_out=...)` takes, per param group, a list of bf16/fp16 tensors (one per
param, same numel; typically pinned buffers for a host-to-device copy) and writes the
updated parameters into them in the same pass over memory.

Params are fp32; their gradients may be fp32, bf16 or fp16 (a `grad_dtype` other than the
param's, or a gradient copied from a device as it is): 16-bit gradients are read as they are
and widened inside the step, which then equals the step on `grad.float()` bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from ds_kernels._cpu_optim_op import GRAD_KINDS
from ds_kernels._hparams import check_betas, check_flags
from ds_kernels._ops import load
from ds_kernels._registry import OpImpl

LowPrecisionOut = Sequence[Sequence[torch.Tensor] | None] | None


def _scalar_step() -> torch.Tensor:
    # torch.optim keeps `step` as a float32 0-dim tensor on CPU (non-fused); same here.
    return torch.tensor(0.0, dtype=torch.float32)


def _positive(name: str, value: float, allow_zero: bool = True) -> None:
    if not (value > 0 or (allow_zero and value == 0)) or math.isnan(value):
        raise ValueError(f"invalid {name}: {value} (must be {'>= 0' if allow_zero else '> 0'})")


class _CPUOptimizer(torch.optim.Optimizer):
    """Shared plumbing: op loading, grad collection, unsupported-flag checks."""

    _unsupported_flags: tuple[str, ...] = ("maximize", "differentiable")

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], num_threads: int | None):
        super().__init__(params, defaults)
        self.num_threads: int = int(num_threads or 0)  # 0: torch.get_num_threads() at step time
        self._op: OpImpl = load("cpu_optim")

    @property
    def backend(self) -> str:
        """'prebuilt', 'cached', 'jit' (compiled) or 'fallback' (pure PyTorch)."""
        return self._op.backend.value

    def _check_group(self, index: int, group: dict[str, Any]) -> None:
        for flag in self._unsupported_flags:
            if group.get(flag):
                raise ValueError(
                    f"{type(self).__name__} does not implement {flag}=True (param group {index}); "
                    f"use the torch.optim optimizer for that setting"
                )

    def _collect(
        self, index: int, group: dict[str, Any], outs: Sequence[torch.Tensor] | None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor] | None]:
        params, grads, kept_outs = [], [], []
        if outs is not None and len(outs) != len(group["params"]):
            raise ValueError(
                f"low_precision_out[{index}] has {len(outs)} tensors; param group {index} "
                f"has {len(group['params'])} params (pass one buffer per param)"
            )
        for j, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ValueError(f"{type(self).__name__} does not support sparse gradients")
            if p.dtype != torch.float32 or p.device.type != "cpu":
                raise ValueError(
                    f"{type(self).__name__} needs fp32 CPU params; param {j} of group {index} "
                    f"is {p.dtype} on {p.device} (keep an fp32 CPU master copy for offload)"
                )
            grad = p.grad
            if grad.dtype not in GRAD_KINDS:
                grad = grad.float()  # fp64 and the like: the op reads fp32, bf16 and fp16
            # bf16/fp16 gradients go to the op as they are: it widens them inside its one pass
            # (an upcast here would be a read of 2 and a write of 4 bytes per element more)
            params.append(p)
            grads.append(grad.contiguous())
            if outs is not None:
                kept_outs.append(outs[j])
        return params, grads, (kept_outs if outs is not None else None)

    @staticmethod
    def _outs_for(low_precision_out: LowPrecisionOut, index: int) -> Sequence[torch.Tensor] | None:
        if low_precision_out is None:
            return None
        return low_precision_out[index]

    def _check_out_groups(self, low_precision_out: LowPrecisionOut) -> None:
        if low_precision_out is not None and len(low_precision_out) != len(self.param_groups):
            raise ValueError(
                f"low_precision_out has {len(low_precision_out)} entries for "
                f"{len(self.param_groups)} param groups (pass one list, or None, per group)"
            )


class CPUAdam(_CPUOptimizer):
    """Adam / AdamW on CPU over fp32 params and states (DeepSpeedCPUAdam's role).

    The signature is DeepSpeedCPUAdam's (names, defaults and positional order: lr,
    bias_correction, betas, eps, weight_decay, amsgrad, adamw_mode, fp32_optimizer_states).
    adamw_mode=True (default) applies decoupled weight decay (AdamW); False adds
    weight_decay * param to the gradient (Adam with L2). Stored in the group as torch's
    `decoupled_weight_decay`, so the state dict keeps its meaning in torch.optim.Adam/AdamW.
    Params are fp32, so states are fp32 whatever `fp32_optimizer_states` says (as in
    DeepSpeed, where False means "states in the param dtype").
    """

    _unsupported_flags = ("amsgrad", "maximize", "differentiable", "capturable")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        adamw_mode: bool = True,
        fp32_optimizer_states: bool = True,
        *,
        num_threads: int | None = None,
    ) -> None:
        check_flags(
            "CPUAdam",
            bias_correction=bias_correction,
            amsgrad=amsgrad,
            adamw_mode=adamw_mode,
            fp32_optimizer_states=fp32_optimizer_states,
        )
        _positive("lr", lr)
        _positive("eps", eps)
        _positive("weight_decay", weight_decay)
        check_betas(betas)
        if amsgrad:
            raise ValueError(
                "CPUAdam does not implement amsgrad=True; use torch.optim.AdamW(amsgrad=True) "
                "or set amsgrad to false"
            )
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": False,
            "maximize": False,
            "foreach": None,
            "capturable": False,
            "differentiable": False,
            "fused": None,
            "decoupled_weight_decay": bool(adamw_mode),
            "bias_correction": bool(bias_correction),
        }
        super().__init__(params, defaults, num_threads)

    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], float] | None = None,
        *,
        low_precision_out: LowPrecisionOut = None,
    ) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_out_groups(low_precision_out)
        for gi, group in enumerate(self.param_groups):
            self._check_group(gi, group)
            params, grads, outs = self._collect(gi, group, self._outs_for(low_precision_out, gi))
            if not params:
                continue
            beta1, beta2 = group["betas"]
            exp_avgs, exp_avg_sqs, bc1, bc2s = [], [], [], []
            for p in params:
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = _scalar_step()
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                step = float(state["step"])
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                if group.get("bias_correction", True):
                    bc1.append(1 - beta1**step)
                    bc2s.append((1 - beta2**step) ** 0.5)
                else:
                    bc1.append(1.0)
                    bc2s.append(1.0)
            self._op.adam(
                params, grads, exp_avgs, exp_avg_sqs, outs,
                lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2),
                eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
                decoupled=bool(group.get("decoupled_weight_decay", True)),
                bias_correction1=bc1, bias_correction2_sqrt=bc2s, num_threads=self.num_threads,
            )  # fmt: skip
        return loss


class CPUAdagrad(_CPUOptimizer):
    """Adagrad on CPU, torch.optim.Adagrad's math (lr_decay, weight_decay as L2, eps).

    Accepts DeepSpeedCPUAdagrad's keywords (lr, eps, weight_decay, amsgrad,
    fp32_optimizer_states) and torch's (lr_decay, initial_accumulator_value). Everything
    after lr is keyword-only: the two libraries' positional orders disagree (DeepSpeed's third
    is eps, torch's lr_decay), and both are floats, so a positional call could not be checked.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        *,
        eps: float = 1e-10,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        fp32_optimizer_states: bool = True,
        lr_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        num_threads: int | None = None,
    ) -> None:
        check_flags("CPUAdagrad", amsgrad=amsgrad, fp32_optimizer_states=fp32_optimizer_states)
        # DeepSpeed accepts amsgrad here and ignores it; Adagrad has no amsgrad variant.
        if amsgrad:
            raise ValueError(
                "CPUAdagrad: amsgrad=True is not an Adagrad option (DeepSpeedCPUAdagrad ignores "
                "it silently); remove it, or use torch.optim.AdamW(amsgrad=True)"
            )
        _positive("lr", lr)
        _positive("lr_decay", lr_decay)
        _positive("weight_decay", weight_decay)
        _positive("initial_accumulator_value", initial_accumulator_value)
        _positive("eps", eps)
        defaults = {
            "lr": lr,
            "lr_decay": lr_decay,
            "eps": eps,
            "weight_decay": weight_decay,
            "initial_accumulator_value": initial_accumulator_value,
            "foreach": None,
            "maximize": False,
            "differentiable": False,
            "fused": None,
        }
        super().__init__(params, defaults, num_threads)

    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], float] | None = None,
        *,
        low_precision_out: LowPrecisionOut = None,
    ) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_out_groups(low_precision_out)
        for gi, group in enumerate(self.param_groups):
            self._check_group(gi, group)
            params, grads, outs = self._collect(gi, group, self._outs_for(low_precision_out, gi))
            if not params:
                continue
            sums, neg_clr = [], []
            lr, lr_decay = float(group["lr"]), float(group["lr_decay"])
            for p in params:
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = _scalar_step()
                    state["sum"] = torch.full_like(
                        p, group["initial_accumulator_value"], memory_format=torch.preserve_format
                    )
                state["step"] += 1
                step = float(state["step"])
                sums.append(state["sum"])
                neg_clr.append(-(lr / (1 + (step - 1) * lr_decay)))
            self._op.adagrad(
                params, grads, sums, outs, neg_clr=neg_clr, eps=float(group["eps"]),
                weight_decay=float(group["weight_decay"]), num_threads=self.num_threads,
            )  # fmt: skip
        return loss


class CPULion(_CPUOptimizer):
    """Lion (Chen et al. 2023) on CPU: sign of an interpolated momentum, decoupled decay.

    Signature and defaults are DeepSpeedCPULion's (lr=1e-3, betas=(0.9, 0.999)), so a
    DeepSpeed config that leaves them out trains the same; the paper suggests lr 3-10x
    smaller than AdamW's and betas=(0.9, 0.99).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        fp32_optimizer_states: bool = True,
        *,
        num_threads: int | None = None,
    ) -> None:
        check_flags("CPULion", fp32_optimizer_states=fp32_optimizer_states)
        _positive("lr", lr)
        _positive("weight_decay", weight_decay)
        check_betas(betas)
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "weight_decay": weight_decay,
            "maximize": False,
            "differentiable": False,
        }
        super().__init__(params, defaults, num_threads)

    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], float] | None = None,
        *,
        low_precision_out: LowPrecisionOut = None,
    ) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_out_groups(low_precision_out)
        for gi, group in enumerate(self.param_groups):
            self._check_group(gi, group)
            params, grads, outs = self._collect(gi, group, self._outs_for(low_precision_out, gi))
            if not params:
                continue
            exp_avgs = []
            for p in params:
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = _scalar_step()
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                exp_avgs.append(state["exp_avg"])
            beta1, beta2 = group["betas"]
            self._op.lion(
                params, grads, exp_avgs, outs, lr=float(group["lr"]), beta1=float(beta1),
                beta2=float(beta2), weight_decay=float(group["weight_decay"]),
                num_threads=self.num_threads,
            )  # fmt: skip
        return loss
