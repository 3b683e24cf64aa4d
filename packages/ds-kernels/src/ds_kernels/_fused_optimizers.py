"""FusedAdam, FusedLamb, FusedLion: torch.optim.Optimizer subclasses over the `fused_optim` op.

- Params may be fp32, bf16 or fp16; states are fp32. With `master_weights=True` a bf16/fp16
  param gets an fp32 master copy (state key ``master_param``) that the update runs on; the
  param receives the rounded result in the same kernel pass.
- `step(grad_scale=..., found_inf=...)`: gradients are divided by `grad_scale` inline; a
  non-zero `found_inf` skips the update (and the step count) on the device, no host sync.
- `check_finite=True`: each step first computes `optimizer.found_inf` (1.0 if any gradient
  is inf/nan) and skips the update when set; a loss scaler reads the flag afterwards.
- State keys and group keys are torch.optim.AdamW's (exp_avg, exp_avg_sq, step), so state
  dicts move between FusedAdam and torch.optim.Adam/AdamW.
- Constructor names, defaults and positional order are DeepSpeed's FusedAdam / FusedLamb /
  FusedLion ones; options DeepSpeed has and these do not implement (amsgrad, LAMB's
  eps_inside_sqrt and max_grad_norm) raise instead of being ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from ds_kernels._fused_op import TorchFusedOptim
from ds_kernels._hparams import check_betas, check_flags
from ds_kernels._ops import load

_Bucket = dict[str, list[torch.Tensor]]


def _check_hparams(lr: float, betas: tuple[float, ...], eps: float, weight_decay: float) -> None:
    if not lr >= 0:
        raise ValueError(f"invalid lr: {lr} (must be >= 0)")
    if not eps >= 0:
        raise ValueError(f"invalid eps: {eps} (must be >= 0)")
    if not weight_decay >= 0:
        raise ValueError(f"invalid weight_decay: {weight_decay} (must be >= 0)")
    check_betas(betas)


def _no_amsgrad(cls: str, amsgrad: bool) -> None:
    if amsgrad:
        raise ValueError(
            f"{cls} does not implement amsgrad=True (DeepSpeed's does not either); use "
            "torch.optim.AdamW(amsgrad=True) or set amsgrad to false"
        )


class _FusedOptimizer(torch.optim.Optimizer):
    """Shared plumbing: state creation, bucketing by device/dtype, step counts, inf flag."""

    _state_keys: tuple[str, ...] = ()
    _unsupported_flags: tuple[str, ...] = ("maximize", "differentiable")

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        master_weights: bool,
        check_finite: bool,
        set_grad_none: bool = True,
    ) -> None:
        check_flags(
            type(self).__name__,
            master_weights=master_weights,
            check_finite=check_finite,
            set_grad_none=set_grad_none,
        )
        super().__init__(params, defaults)
        self.master_weights: bool = master_weights
        self.check_finite: bool = check_finite
        self.set_grad_none: bool = bool(set_grad_none)
        self._op = load("fused_optim")
        self._fallback = TorchFusedOptim()
        # Device flag written by the finite check; created on first use on the params' device.
        self.found_inf: torch.Tensor | None = None

    @property
    def backend(self) -> str:
        """'triton' or 'fallback'."""
        return self._op.backend.value

    def zero_grad(self, set_to_none: bool | None = None) -> None:
        """DeepSpeed's `set_grad_none` decides when `set_to_none` is not given; False zeroes
        the gradients in place (their memory is kept, e.g. for a preallocated grad buffer)."""
        super().zero_grad(self.set_grad_none if set_to_none is None else set_to_none)

    def _op_for(self, device: torch.device):
        return self._op if self._op.supports(device) else self._fallback

    def _init_state(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        state["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device)
        for key in self._state_keys:
            state[key] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        if self.master_weights and p.dtype != torch.float32:
            state["master_param"] = p.detach().float().contiguous()

    def _buckets(self, gi: int, group: dict[str, Any]) -> list[_Bucket]:
        for flag in self._unsupported_flags:
            if group.get(flag):
                raise ValueError(
                    f"{type(self).__name__} does not implement {flag}=True (param group {gi})"
                )
        buckets: dict[tuple, _Bucket] = {}
        for j, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ValueError(f"{type(self).__name__} does not support sparse gradients")
            if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise ValueError(
                    f"{type(self).__name__}: param {j} of group {gi} is {p.dtype}; "
                    "supported: float32, bfloat16, float16"
                )
            if not p.is_contiguous():
                raise ValueError(
                    f"{type(self).__name__}: param {j} of group {gi} is not contiguous"
                )
            state = self.state[p]
            if len(state) == 0:
                self._init_state(p, state)
            elif state["step"].device != p.device:
                # A state dict saved by a non-fused torch optimizer keeps `step` on the CPU.
                state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
            master = state.get("master_param")
            key = (p.device, p.dtype, p.grad.dtype, master is not None)
            b = buckets.setdefault(key, {"params": [], "grads": [], "steps": [], "masters": []})
            b["params"].append(p)
            b["grads"].append(p.grad.contiguous())
            b["steps"].append(state["step"])
            if master is not None:
                b["masters"].append(master)
            for k in self._state_keys:
                b.setdefault(k, []).append(state[k])
        return list(buckets.values())

    def _prepare_flags(
        self,
        grad_scale: torch.Tensor | float | None,
        found_inf: torch.Tensor | None,
        buckets: list[list[_Bucket]],
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        first = next((b for bs in buckets for b in bs), None)
        if first is None:
            return None, found_inf
        device = first["params"][0].device
        scale = None
        if grad_scale is not None:
            scale = torch.as_tensor(grad_scale, dtype=torch.float32, device=device).reshape(1)
        if self.check_finite:
            if self.found_inf is None or self.found_inf.device != device:
                self.found_inf = torch.zeros(1, dtype=torch.float32, device=device)
            self.found_inf.zero_()
            if found_inf is not None:
                self.found_inf.copy_(found_inf.reshape(1).float())
            for bs in buckets:
                for b in bs:
                    self._op_for(device).check_finite(b["grads"], self.found_inf, scale)
            found_inf = self.found_inf
        elif found_inf is not None:
            found_inf = found_inf.to(device=device, dtype=torch.float32).reshape(1)
        return scale, found_inf

    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], float] | None = None,
        *,
        grad_scale: torch.Tensor | float | None = None,
        found_inf: torch.Tensor | None = None,
    ) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        buckets = [self._buckets(gi, g) for gi, g in enumerate(self.param_groups)]
        scale, inf_flag = self._prepare_flags(grad_scale, found_inf, buckets)
        for group, bs in zip(self.param_groups, buckets):
            for b in bs:
                torch._foreach_add_(b["steps"], 1.0)
                op = self._op_for(b["params"][0].device)
                self._apply(op, group, b, scale, inf_flag)
                if inf_flag is not None:
                    # Skipped steps do not count, as in torch's fused optimizers.
                    torch._foreach_sub_(b["steps"], [inf_flag.reshape(())] * len(b["steps"]))
        return loss

    def _apply(self, op, group, b: _Bucket, scale, found_inf) -> None:  # pragma: no cover
        raise NotImplementedError


class FusedAdam(_FusedOptimizer):
    """Adam / AdamW with multi-tensor Triton kernels (DeepSpeed FusedAdam's role)."""

    _state_keys = ("exp_avg", "exp_avg_sq")
    _unsupported_flags = ("amsgrad", "maximize", "differentiable")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        adam_w_mode: bool = True,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        set_grad_none: bool = True,
        *,
        master_weights: bool = False,
        check_finite: bool = False,
    ) -> None:
        check_flags(
            "FusedAdam", bias_correction=bias_correction, adam_w_mode=adam_w_mode, amsgrad=amsgrad
        )
        _check_hparams(lr, betas, eps, weight_decay)
        _no_amsgrad("FusedAdam", amsgrad)
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
            "decoupled_weight_decay": bool(adam_w_mode),
            "bias_correction": bool(bias_correction),
        }
        super().__init__(params, defaults, master_weights, check_finite, set_grad_none)

    def _apply(self, op, group, b: _Bucket, scale, found_inf) -> None:
        beta1, beta2 = group["betas"]
        op.adam(
            b["params"], b["grads"], b["exp_avg"], b["exp_avg_sq"], b["masters"] or None,
            b["steps"], lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2),
            eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
            decoupled=bool(group.get("decoupled_weight_decay", True)),
            bias_correction=bool(group.get("bias_correction", True)),
            grad_scale=scale, found_inf=found_inf,
        )  # fmt: skip


class FusedLamb(_FusedOptimizer):
    """LAMB (You et al. 2019): Adam moments, update + weight_decay * w, scaled per tensor by
    the trust ratio ||w|| / ||update|| clamped to [min_coeff, max_coeff] (DeepSpeed's
    defaults), 1 where either norm is zero."""

    _state_keys = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        eps_inside_sqrt: bool = False,
        weight_decay: float = 0.0,
        max_grad_norm: float = 0.0,
        max_coeff: float = 10.0,
        min_coeff: float = 0.01,
        amsgrad: bool = False,
        *,
        master_weights: bool = False,
        check_finite: bool = False,
    ) -> None:
        check_flags(
            "FusedLamb",
            bias_correction=bias_correction,
            eps_inside_sqrt=eps_inside_sqrt,
            amsgrad=amsgrad,
        )
        _check_hparams(lr, betas, eps, weight_decay)
        _no_amsgrad("FusedLamb", amsgrad)
        if eps_inside_sqrt:
            raise ValueError(
                "FusedLamb does not implement eps_inside_sqrt=True (eps is added to sqrt(v_hat), "
                "as in the paper and DeepSpeed's default); set eps_inside_sqrt to false"
            )
        if not max_grad_norm == 0:
            # DeepSpeed applies it only when step() is handed precomputed grad norms.
            raise ValueError(
                f"FusedLamb does not clip by max_grad_norm={max_grad_norm}; set it to 0 and clip "
                "with the engine's gradient_clipping (or torch.nn.utils.clip_grad_norm_)"
            )
        if not 0 <= min_coeff <= max_coeff:
            raise ValueError(
                f"invalid min_coeff/max_coeff: {min_coeff}/{max_coeff} (need 0 <= min <= max)"
            )
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "bias_correction": bool(bias_correction),
            "max_coeff": max_coeff,
            "min_coeff": min_coeff,
            "maximize": False,
            "differentiable": False,
        }
        super().__init__(params, defaults, master_weights, check_finite)

    def _apply(self, op, group, b: _Bucket, scale, found_inf) -> None:
        beta1, beta2 = group["betas"]
        op.lamb(
            b["params"], b["grads"], b["exp_avg"], b["exp_avg_sq"], b["masters"] or None,
            b["steps"], lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2),
            eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
            bias_correction=bool(group.get("bias_correction", True)),
            max_coeff=float(group["max_coeff"]), min_coeff=float(group["min_coeff"]),
            grad_scale=scale, found_inf=found_inf,
        )  # fmt: skip


class FusedLion(_FusedOptimizer):
    """Lion (Chen et al. 2023): sign of interpolated momentum, decoupled weight decay.

    Defaults are DeepSpeed FusedLion's (lr=1e-3, betas=(0.9, 0.999)); the paper suggests an
    lr 3-10x smaller than AdamW's and betas=(0.9, 0.99)."""

    _state_keys = ("exp_avg",)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        set_grad_none: bool = True,
        *,
        master_weights: bool = False,
        check_finite: bool = False,
    ) -> None:
        _check_hparams(lr, betas, 0.0, weight_decay)
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "weight_decay": weight_decay,
            "maximize": False,
            "differentiable": False,
        }
        super().__init__(params, defaults, master_weights, check_finite, set_grad_none)

    def _apply(self, op, group, b: _Bucket, scale, found_inf) -> None:
        beta1, beta2 = group["betas"]
        op.lion(
            b["params"], b["grads"], b["exp_avg"], b["masters"] or None,
            lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2),
            weight_decay=float(group["weight_decay"]), grad_scale=scale, found_inf=found_inf,
        )  # fmt: skip
