"""1-bit Adam (Tang et al., 2021, arXiv:2102.02888).

Two stages:

* warmup (steps ``1..freeze_step``): exact Adam on the exactly averaged gradient; the variance
  ``v`` converges to a stable value;
* compression (steps ``> freeze_step``): ``v`` is frozen, so Adam becomes momentum SGD with a fixed
  per-coordinate preconditioner; each rank updates its momentum with its *local* gradient and the
  momentum is averaged with :func:`compressed_allreduce` (worker + server error feedback). All
  ranks then hold the same momentum and apply the same update.

Parameter names follow DeepSpeed's ``OnebitAdam``. Differences: ``bias_correction=True`` is
applied (DeepSpeed accepts and ignores it; the variance correction stops at ``freeze_step`` with
the variance), ``max_grad_norm`` clips by the global norm of the gradients used (DeepSpeed
ignores it), ``comm_backend_name=None`` means "the torch.distributed backend that is running",
and all momenta of a parameter group travel as one flat buffer (one compressed all-reduce per
group, not one per tensor).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from ds_comm._logger import CommsLogger
from ds_comm._optim_base import OneBitOptimizerBase


class OneBitAdam(OneBitOptimizerBase):
    """1-bit Adam. Takes local gradients (see the ``ds_comm._optim_base`` contract).

    Args (DeepSpeed's names): ``lr``, ``freeze_step`` (exact-Adam warmup steps), ``bias_correction``,
    ``betas``, ``eps``, ``eps_inside_sqrt``, ``weight_decay`` (decoupled, added to the update as in
    DeepSpeed/AdamW), ``max_grad_norm`` (0 = off), ``amsgrad`` (unsupported: must be False),
    ``cuda_aware`` (MPI transport reads device memory directly), ``comm_backend_name`` (``"nccl"``,
    ``"gloo"``, ``"mpi"``; None = the running torch.distributed backend). Keyword-only extras:
    ``group`` (data-parallel process group), ``allreduce_gradients``, ``logger``.
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
        amsgrad: bool = False,
        cuda_aware: bool = False,
        comm_backend_name: str | None = None,
        *,
        group: Any = None,
        allreduce_gradients: bool = True,
        logger: CommsLogger | None = None,
    ) -> None:
        if amsgrad:
            raise ValueError("OneBitAdam: amsgrad=True is not supported by 1-bit Adam")
        if freeze_step < 0:
            raise ValueError(f"OneBitAdam: freeze_step={freeze_step} must be >= 0")
        _check_common(lr, betas, eps, weight_decay, "OneBitAdam")
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
        self.freeze_step: int = freeze_step
        self.eps_inside_sqrt: bool = eps_inside_sqrt
        self.steps_taken: int = 0

    @property
    def adam_freeze_key(self) -> bool:
        """True when the next ``step()`` uses the frozen variance and compressed momentum."""
        return self.steps_taken + 1 > self.freeze_step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        t = self.steps_taken + 1
        frozen = t > self.freeze_step
        for gi, group in enumerate(self.param_groups):
            params = self._trainable(group)
            if not params:
                continue
            beta1, beta2 = group["betas"]
            grads = self._grads(params, clone=False)
            if not frozen:
                self._exact_mean(grads)
            self._clip(grads, group["max_grad_norm"])
            for p, g in zip(params, grads):
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                st["step"] = t
                st["exp_avg"].mul_(beta1).add_(g, alpha=1 - beta1)
                if not frozen:
                    st["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            if frozen:
                self._compressed_mean([self.state[p]["exp_avg"] for p in params], gi, "exp_avg")
            if group["bias_correction"]:
                bc1 = 1 - beta1**t
                bc2 = 1 - beta2 ** min(t, self.freeze_step) if self.freeze_step > 0 else 1.0
            else:
                bc1 = bc2 = 1.0
            for p in params:
                st = self.state[p]
                denom = self._denom(st["exp_avg_sq"], bc2, group["eps"], self.eps_inside_sqrt)
                update = st["exp_avg"] / bc1 / denom
                if group["weight_decay"] > 0:
                    update.add_(p, alpha=group["weight_decay"])
                p.add_(update, alpha=-group["lr"])
        self.steps_taken = t
        return loss

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["steps_taken"] = self.steps_taken
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.steps_taken = int(state_dict.pop("steps_taken", 0))
        super().load_state_dict(state_dict)


def _check_common(lr: float, betas, eps: float, weight_decay: float, name: str) -> None:
    if lr < 0:
        raise ValueError(f"{name}: lr={lr} must be >= 0")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"{name}: betas={betas} must be two values in [0, 1)")
    if eps <= 0:
        raise ValueError(f"{name}: eps={eps} must be > 0")
    if weight_decay < 0:
        raise ValueError(f"{name}: weight_decay={weight_decay} must be >= 0")
