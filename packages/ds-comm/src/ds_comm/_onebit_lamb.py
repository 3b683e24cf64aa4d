"""1-bit LAMB (Li et al., 2022, "1-bit LAMB: Communication Efficient Large-Scale Large-Batch
Training with LAMB's Convergence Speed", arXiv:2104.06069), following DeepSpeed's ``OnebitLamb``.

* warmup (steps ``1..freeze_step``): exact LAMB on the averaged gradient. Each layer's trust
  ratio ``clip(||w|| / ||update||, min_coeff, max_coeff)`` is tracked as an exponential moving
  average (``coeff_beta``).
* compression (steps ``> freeze_step``): the variance ``v`` and the layer-wise LAMB coefficients are
  frozen (the coefficient at its warmup average). Momenta are updated locally, scaled per layer so
  that all layers have the same RMS (the "scaling coefficients", fixed at the end of warmup: one
  flat buffer with mixed magnitudes would otherwise be compressed with one scale per chunk), and
  averaged with :func:`compressed_allreduce`. A fresh variance is kept from the gradients
  reconstructed from consecutive momenta, ``g = (m_t - beta1 m_{t-1}) / (1 - beta1)``; the ratio
  ``max(denom_frozen / denom_fresh)`` scales the frozen coefficient, clipped to
  ``[factor_min, factor_max]`` and to a relative change of ``factor_threshold`` per step.

Differences from DeepSpeed, all documented in the README: bias correction is applied when
``bias_correction=True`` (DeepSpeed ignores the flag); the coefficient EMA is bias-corrected
(DeepSpeed's starts at 0, which under-estimates the frozen coefficient by ``coeff_beta**n`` for a
short warmup); a layer whose momentum is exactly zero at the freeze gets scaling coefficient 1
instead of a division by zero.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from ds_comm._logger import CommsLogger
from ds_comm._onebit_adam import _check_common
from ds_comm._optim_base import OneBitOptimizerBase


class OneBitLamb(OneBitOptimizerBase):
    """1-bit LAMB with DeepSpeed's parameter names (see the module docstring).

    ``max_coeff``/``min_coeff`` bound the trust ratio; ``coeff_beta`` is the EMA factor of the
    warmup coefficients; ``factor_max``/``factor_min``/``factor_threshold`` bound the correction of
    the frozen coefficient in the compression stage. Other arguments as :class:`OneBitAdam`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        freeze_step: int = 100000,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        eps_inside_sqrt: bool = False,
        weight_decay: float = 0.0,
        max_grad_norm: float = 0.0,
        max_coeff: float = 10.0,
        min_coeff: float = 0.01,
        amsgrad: bool = False,
        cuda_aware: bool = False,
        comm_backend_name: str | None = None,
        coeff_beta: float = 0.9,
        factor_max: float = 4.0,
        factor_min: float = 0.5,
        factor_threshold: float = 0.1,
        *,
        group: Any = None,
        allreduce_gradients: bool = True,
        logger: CommsLogger | None = None,
    ) -> None:
        if amsgrad:
            raise ValueError("OneBitLamb: amsgrad=True is not supported by 1-bit LAMB")
        if freeze_step < 0:
            raise ValueError(f"OneBitLamb: freeze_step={freeze_step} must be >= 0")
        _check_common(lr, betas, eps, weight_decay, "OneBitLamb")
        if not 0 < min_coeff <= max_coeff:
            raise ValueError(
                f"OneBitLamb: need 0 < min_coeff ({min_coeff}) <= max_coeff ({max_coeff})"
            )
        if not 0 < factor_min <= 1 <= factor_max:
            raise ValueError(
                f"OneBitLamb: need 0 < factor_min ({factor_min}) <= 1 <= factor_max ({factor_max})"
            )
        defaults = dict(
            lr=lr,
            bias_correction=bias_correction,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            max_grad_norm=max_grad_norm,
            max_coeff=max_coeff,
            min_coeff=min_coeff,
        )
        super().__init__(
            params,
            defaults,
            cuda_aware=cuda_aware,
            comm_backend_name=comm_backend_name,
            group=group,
            allreduce_gradients=allreduce_gradients,
            logger=logger,
        )
        self.freeze_step: int = freeze_step
        self.eps_inside_sqrt: bool = eps_inside_sqrt
        self.coeff_beta: float = coeff_beta
        self.factor_max: float = factor_max
        self.factor_min: float = factor_min
        self.factor_threshold: float = factor_threshold
        self.steps_taken: int = 0
        #: the coefficients applied in the last step, one per trainable parameter (diagnostics)
        self.lamb_coeffs: list[float] = []

    @property
    def lamb_freeze_key(self) -> bool:
        """True when the next ``step()`` runs the compression stage."""
        return self.steps_taken + 1 > self.freeze_step

    def _bias(self, group: dict[str, Any], t: int, t_var: int) -> tuple[float, float]:
        if not group["bias_correction"]:
            return 1.0, 1.0
        beta1, beta2 = group["betas"]
        return 1 - beta1**t, (1 - beta2**t_var) if t_var > 0 else 1.0

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        t = self.steps_taken + 1
        self.lamb_coeffs = []
        if t > self.freeze_step:
            self._compression_step(t)
        else:
            self._warmup_step(t)
        self.steps_taken = t
        return loss

    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        st = self.state[p]
        if not st:
            st["step"] = 0
            st["exp_avg"] = torch.zeros_like(p)
            st["exp_avg_sq"] = torch.zeros_like(p)
            st["lamb_coeff_ema"] = 0.0
            st["lamb_coeff_count"] = 0
            st["last_factor"] = 1.0
        return st

    def _trust_ratio(self, p: torch.Tensor, update: torch.Tensor, group: dict[str, Any]) -> float:
        w_norm = torch.linalg.vector_norm(p).item()
        u_norm = torch.linalg.vector_norm(update).item()
        if w_norm == 0 or u_norm == 0:
            return 1.0
        return min(max(w_norm / u_norm, group["min_coeff"]), group["max_coeff"])

    def _warmup_step(self, t: int) -> None:
        for group in self.param_groups:
            params = self._trainable(group)
            if not params:
                continue
            beta1, beta2 = group["betas"]
            grads = self._grads(params, clone=False)
            self._exact_mean(grads)
            self._clip(grads, group["max_grad_norm"])
            bc1, bc2 = self._bias(group, t, t)
            for p, g in zip(params, grads):
                st = self._init_state(p)
                st["step"] = t
                st["exp_avg"].mul_(beta1).add_(g, alpha=1 - beta1)
                st["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                if t == self.freeze_step:
                    st["exp_avg_sq_fresh"] = st["exp_avg_sq"].clone()
                denom = self._denom(st["exp_avg_sq"], bc2, group["eps"], self.eps_inside_sqrt)
                update = st["exp_avg"] / bc1 / denom
                if group["weight_decay"] > 0:
                    update.add_(p, alpha=group["weight_decay"])
                coeff = self._trust_ratio(p, update, group)
                st["lamb_coeff_ema"] = (
                    self.coeff_beta * st["lamb_coeff_ema"] + (1 - self.coeff_beta) * coeff
                )
                st["lamb_coeff_count"] += 1
                self.lamb_coeffs.append(coeff)
                p.add_(update, alpha=-group["lr"] * coeff)

    def _freeze(self) -> None:
        """End of warmup: fix the coefficients and the per-layer momentum scaling."""
        rms: list[tuple[dict[str, Any], float]] = []
        for group in self.param_groups:
            for p in self._trainable(group):
                st = self._init_state(p)
                m = st["exp_avg"]
                rms.append((st, (torch.linalg.vector_norm(m) / m.numel() ** 0.5).item()))
                n = st["lamb_coeff_count"]
                st["lamb_coeff_freeze"] = (
                    st["lamb_coeff_ema"] / (1 - self.coeff_beta**n) if n > 0 else 1.0
                )
                if "exp_avg_sq_fresh" not in st:  # freeze_step == 0: nothing to copy yet
                    st["exp_avg_sq_fresh"] = st["exp_avg_sq"].clone()
        nonzero = [r for _, r in rms if r > 0]
        united = sum(nonzero) / len(nonzero) if nonzero else 1.0
        for st, r in rms:
            st["scaling_coeff"] = united / r if r > 0 else 1.0

    def _compression_step(self, t: int) -> None:
        first = self.param_groups and any(
            "scaling_coeff" not in self.state[p]
            for g in self.param_groups
            for p in self._trainable(g)
        )
        if first:
            self._freeze()
        t_var = min(t, self.freeze_step)
        for gi, group in enumerate(self.param_groups):
            params = self._trainable(group)
            if not params:
                continue
            beta1, beta2 = group["betas"]
            grads = self._grads(params, clone=False)
            self._clip(grads, group["max_grad_norm"])
            last = [self.state[p]["exp_avg"].clone() for p in params]
            for p, g in zip(params, grads):
                st = self.state[p]
                st["step"] = t
                st["exp_avg"].mul_(beta1).add_(g, alpha=1 - beta1).mul_(st["scaling_coeff"])
            self._compressed_mean([self.state[p]["exp_avg"] for p in params], gi, "exp_avg")
            bc1, bc2 = self._bias(group, t, t_var)
            _, bc2_fresh = self._bias(group, t, t)
            for p, m_last in zip(params, last):
                st = self.state[p]
                m = st["exp_avg"].div_(st["scaling_coeff"])
                g_rec = (m - m_last * beta1) / (1 - beta1)
                st["exp_avg_sq_fresh"].mul_(beta2).addcmul_(g_rec, g_rec, value=1 - beta2)
                denom = self._denom(st["exp_avg_sq"], bc2, group["eps"], self.eps_inside_sqrt)
                update_prelim = m / bc1 / denom
                update = update_prelim
                if group["weight_decay"] > 0:
                    update = update_prelim + group["weight_decay"] * p
                denom_real = self._denom(
                    st["exp_avg_sq_fresh"], bc2_fresh, group["eps"], self.eps_inside_sqrt
                )
                factor = (denom / denom_real).max().item()
                if group["weight_decay"] > 0:
                    ratio = min(
                        1.0,
                        (
                            torch.linalg.vector_norm(update_prelim)
                            / torch.linalg.vector_norm(update).clamp_min(1e-30)
                        ).item(),
                    )
                    factor = factor * ratio + (1.0 - ratio)
                factor = min(max(factor, self.factor_min), self.factor_max)
                last_f = st["last_factor"]
                factor = min(
                    max(factor, last_f * (1 - self.factor_threshold)),
                    last_f * (1 + self.factor_threshold),
                )
                st["last_factor"] = factor
                coeff = st["lamb_coeff_freeze"] * factor
                self.lamb_coeffs.append(coeff)
                p.add_(update, alpha=-group["lr"] * coeff)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["steps_taken"] = self.steps_taken
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.steps_taken = int(state_dict.pop("steps_taken", 0))
        super().load_state_dict(state_dict)
