"""0/1 Adam (Lu et al., 2022, "Maximizing Communication Efficiency for Large-scale Training via
0/1 Adam", arXiv:2202.06009), following DeepSpeed's ``ZeroOneAdam``.

Two policies replace 1-bit Adam's single freeze point:

* **variance updates on an exponentially thinning schedule** (steps ``<= var_freeze_step``): the
  variance is updated, with an exactly averaged gradient, only on steps that are multiples of
  ``var_interval``; the interval starts at 1 and doubles after every ``var_update_scaler``
  variance updates. On all other steps the gradient is averaged with the 1-bit
  :func:`compressed_allreduce` and only the momentum is updated. After ``var_freeze_step`` the
  variance is frozen.
* **local steps** (steps ``> var_freeze_step``): each rank updates momentum and parameters from its
  local gradient, with no communication, and accumulates its parameter change ``u``. Every
  ``local_step_interval`` steps the ranks synchronise: the local change is undone, ``u`` is
  turned back into an accumulated momentum (times the frozen denominator), averaged with the
  1-bit all-reduce, applied, and the momentum is reset to that average (learning-rate weighted).
  ``local_step_interval`` starts at 1 and doubles every ``local_step_scaler`` steps, capped at
  ``local_step_clipper`` (the paper's H).

Between synchronisations the replicas differ by design; right after a synchronisation step they
are identical. Differences from DeepSpeed: no parameter-free "initialisation" step (DeepSpeed
spends the first ``step()`` allocating buffers), bias correction applied when
``bias_correction=True`` (counting variance updates for the second moment), the gradient and the
local-step buffers have separate error-feedback states instead of one state zeroed at the freeze,
and a synchronisation restores the parameters saved at the previous one (one extra copy of the
parameters) instead of subtracting the local change, so replicas are bitwise equal afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from ds_comm._logger import CommsLogger
from ds_comm._onebit_adam import _check_common
from ds_comm._optim_base import OneBitOptimizerBase


class ZeroOneAdam(OneBitOptimizerBase):
    """0/1 Adam with DeepSpeed's parameter names: ``var_freeze_step``, ``var_update_scaler``
    (the paper's kappa), ``local_step_scaler``, ``local_step_clipper`` (H), plus those of
    :class:`OneBitAdam` (``lr``, ``bias_correction``, ``betas``, ``eps``, ``eps_inside_sqrt``,
    ``weight_decay``, ``max_grad_norm``, ``amsgrad``, ``cuda_aware``, ``comm_backend_name``)."""

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
        var_freeze_step: int = 100000,
        var_update_scaler: int = 16,
        local_step_scaler: int = 32678,
        local_step_clipper: int = 16,
        amsgrad: bool = False,
        cuda_aware: bool = False,
        comm_backend_name: str | None = None,
        *,
        group: Any = None,
        allreduce_gradients: bool = True,
        logger: CommsLogger | None = None,
    ) -> None:
        if amsgrad:
            raise ValueError("ZeroOneAdam: amsgrad=True is not supported by 0/1 Adam")
        _check_common(lr, betas, eps, weight_decay, "ZeroOneAdam")
        for name, v in (
            ("var_update_scaler", var_update_scaler),
            ("local_step_scaler", local_step_scaler),
            ("local_step_clipper", local_step_clipper),
        ):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"ZeroOneAdam: {name}={v!r} must be an integer >= 1")
        if var_freeze_step < 0:
            raise ValueError(f"ZeroOneAdam: var_freeze_step={var_freeze_step} must be >= 0")
        defaults = dict(
            lr=lr,
            bias_correction=bias_correction,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            max_grad_norm=max_grad_norm,
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
        self.eps_inside_sqrt: bool = eps_inside_sqrt
        self.var_freeze_step: int = var_freeze_step
        self.var_update_scaler: int = var_update_scaler
        self.local_step_scaler: int = local_step_scaler
        self.local_step_clipper: int = local_step_clipper
        # Schedule state (global: every parameter follows the same schedule).
        self.steps_taken: int = 0
        self.var_interval: int = 1
        self.var_counter: int = 0
        self.var_updates: int = 0
        self.local_step_interval: int = 1
        self.local_step_counter: int = 0
        #: how the last step communicated: "exact", "compressed_grad", "local" or "sync"
        self.last_step_kind: str = ""

    @property
    def freeze_key(self) -> bool:
        """True once the variance is frozen and local steps are in effect."""
        return self.steps_taken + 1 > self.var_freeze_step

    def _bias(self, group: dict[str, Any], t: int) -> tuple[float, float]:
        if not group["bias_correction"]:
            return 1.0, 1.0
        beta1, beta2 = group["betas"]
        return 1 - beta1**t, (1 - beta2**self.var_updates) if self.var_updates else 1.0

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        t = self.steps_taken + 1
        if t <= self.var_freeze_step:
            self._variance_phase_step(t)
            if t % self.var_interval == 0:
                self.var_counter += 1
                if self.var_counter == self.var_update_scaler:
                    self.var_counter = 0
                    self.var_interval *= 2
        else:
            self._local_phase_step(t)
            self.local_step_counter += 1
            if self.local_step_counter == self.local_step_scaler:
                self.local_step_counter = 0
                self.local_step_interval = min(
                    self.local_step_clipper, self.local_step_interval * 2
                )
        self.steps_taken = t
        return loss

    def _state(self, p: torch.Tensor) -> dict[str, Any]:
        st = self.state[p]
        if not st:
            st["step"] = 0
            st["exp_avg"] = torch.zeros_like(p)
            st["exp_avg_sq"] = torch.zeros_like(p)
        return st

    def _apply(self, group, params, t: int, accumulate: bool) -> None:
        bc1, bc2 = self._bias(group, t)
        for p in params:
            st = self.state[p]
            denom = self._denom(st["exp_avg_sq"], bc2, group["eps"], self.eps_inside_sqrt)
            delta = st["exp_avg"] / denom * (-group["lr"] / bc1)
            if group["weight_decay"] > 0:
                delta.add_(p, alpha=-group["lr"] * group["weight_decay"])
            p.add_(delta)
            if accumulate:
                st["momentum_accumulator"].add_(delta)

    def _variance_phase_step(self, t: int) -> None:
        exact = t % self.var_interval == 0
        if exact:
            self.var_updates += 1
        for gi, group in enumerate(self.param_groups):
            params = self._trainable(group)
            if not params:
                continue
            beta1, beta2 = group["betas"]
            if exact:
                grads = self._grads(params, clone=False)
                self._exact_mean(grads)
            else:
                # A copy: the compressed mean is written back into it, not into p.grad.
                grads = self._grads(params, clone=True)
                self._compressed_mean(grads, gi, "grad")
            self._clip(grads, group["max_grad_norm"])
            for p, g in zip(params, grads):
                st = self._state(p)
                st["step"] = t
                st["exp_avg"].mul_(beta1).add_(g, alpha=1 - beta1)
                if exact:
                    st["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            self._apply(group, params, t, accumulate=False)
        self.last_step_kind = "exact" if exact else "compressed_grad"

    def _local_phase_step(self, t: int) -> None:
        sync = t % self.local_step_interval == 0
        for gi, group in enumerate(self.param_groups):
            params = self._trainable(group)
            if not params:
                continue
            beta1, _ = group["betas"]
            grads = self._grads(params, clone=False)
            self._clip(grads, group["max_grad_norm"])
            bc1, bc2 = self._bias(group, t)
            for p, g in zip(params, grads):
                st = self._state(p)
                st["step"] = t
                st["exp_avg"].mul_(beta1).add_(g, alpha=1 - beta1)
                if "momentum_accumulator" not in st:
                    st["momentum_accumulator"] = torch.zeros_like(p)
                    st["lrs"] = 0.0
                    # The parameters at the last synchronisation, identical on every rank.
                    # Restoring them (rather than subtracting the local change again) keeps the
                    # replicas bitwise equal after a sync: p + u - u is not p in floating point.
                    st["sync_anchor"] = p.detach().clone()
                st["lrs"] += group["lr"] / bc1
            self._apply(group, params, t, accumulate=True)
            if not sync:
                continue
            denoms = []
            for p in params:
                st = self.state[p]
                u = st["momentum_accumulator"]
                p.copy_(st["sync_anchor"])  # undo this rank's local change
                d = self._denom(st["exp_avg_sq"], bc2, group["eps"], self.eps_inside_sqrt)
                u.mul_(d)  # = -(sum of lr_k/bc1_k * m_k) (+ weight-decay terms)
                denoms.append(d)
            self._compressed_mean(
                [self.state[p]["momentum_accumulator"] for p in params], gi, "local_steps"
            )
            for p, d in zip(params, denoms):
                st = self.state[p]
                u = st["momentum_accumulator"]
                st["exp_avg"].copy_(u).div_(-st["lrs"])  # lr-weighted average momentum
                p.add_(u / d)
                st["sync_anchor"].copy_(p)
                u.zero_()
                st["lrs"] = 0.0
        self.last_step_kind = "sync" if sync else "local"

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["schedule"] = {
            k: getattr(self, k)
            for k in (
                "steps_taken",
                "var_interval",
                "var_counter",
                "var_updates",
                "local_step_interval",
                "local_step_counter",
            )
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        for k, v in state_dict.pop("schedule", {}).items():
            setattr(self, k, int(v))
        super().load_state_dict(state_dict)
