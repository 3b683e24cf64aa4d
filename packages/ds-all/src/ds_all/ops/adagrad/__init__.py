"""``deepspeed.ops.adagrad``: ``DeepSpeedCPUAdagrad`` (ds_kernels' ``CPUAdagrad``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ds_kernels import CPUAdagrad


class DeepSpeedCPUAdagrad(CPUAdagrad):
    """``CPUAdagrad`` with DeepSpeed's positional order (lr, eps, weight_decay, amsgrad,
    fp32_optimizer_states): ds_kernels makes everything after lr keyword-only because torch's
    Adagrad orders them differently, but DeepSpeed scripts may pass them by position."""

    def __init__(
        self,
        model_params: Iterable[Any],
        lr: float = 1e-2,
        eps: float = 1e-10,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        fp32_optimizer_states: bool = True,
    ) -> None:
        super().__init__(
            model_params, lr, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            fp32_optimizer_states=fp32_optimizer_states,
        )  # fmt: skip


__all__ = ["DeepSpeedCPUAdagrad"]
