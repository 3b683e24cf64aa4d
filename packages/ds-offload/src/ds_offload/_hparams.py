"""Adam/AdamW hyper-parameters of one param group, read fresh at every step so that an LR
scheduler acting on the group dicts it was given keeps working."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

_DEFAULTS: dict[str, dict[str, Any]] = {
    "adam": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
    "adamw": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2},
}


@dataclass(frozen=True)
class AdamHparams:
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled: bool

    def bias_corrections(self, step: int) -> tuple[float, float]:
        """(1 - beta1^t, sqrt(1 - beta2^t)) computed as torch.optim.Adam does (Python floats)."""
        return 1 - self.beta1**step, math.sqrt(1 - self.beta2**step)


def check_kind(kind: str) -> str:
    if kind not in _DEFAULTS:
        raise ValueError(f"optimizer must be 'adam' or 'adamw' (CPU Adam), got {kind!r}")
    return kind


def read_hparams(kind: str, group: dict[str, Any], overrides: dict[str, Any]) -> AdamHparams:
    merged = {**_DEFAULTS[kind], **overrides, **{k: v for k, v in group.items() if k != "params"}}
    for flag in ("amsgrad", "maximize", "capturable", "differentiable"):
        if merged.get(flag):
            raise ValueError(f"offloaded CPU Adam does not implement {flag}=True; set it to False")
    lr = merged["lr"]
    lr = float(lr.item()) if hasattr(lr, "item") else float(lr)
    beta1, beta2 = (float(b) for b in merged["betas"])
    decoupled = bool(merged.get("decoupled_weight_decay", kind == "adamw"))
    return AdamHparams(
        lr, beta1, beta2, float(merged["eps"]), float(merged["weight_decay"]), decoupled
    )
