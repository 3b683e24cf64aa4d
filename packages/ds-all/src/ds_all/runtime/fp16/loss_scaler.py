"""``deepspeed.runtime.fp16.loss_scaler``: DeepSpeed's loss-scaler classes, with its names,
constructor arguments and attributes (``cur_scale``, ``cur_iter``, ``last_overflow_iter``,
``cur_hysteresis``, ...), for the code that imports them. The commonest use is the line
scripts run for PyTorch 2.6's ``weights_only`` loading,
``torch.serialization.add_safe_globals([ZeroStageEnum, LossScaler])``, which needs the import
to work. The classes keep DeepSpeed's attributes as plain instance state (no hidden fields),
so a pickle of one restores it whole: this module's own under ``weights_only`` once allowed;
one that DeepSpeed itself wrote names DeepSpeed's module path, which resolves to this module
through ds-deepspeed's ``deepspeed`` alias (``weights_only`` matches its allow-list by that
path, so such a file loads with ``weights_only=False``).

The dynamic schedule itself is ds-zero's (``ds_zero.DynamicLossScaler``, DeepSpeed 0.19.8's
``update_scale`` step for step): ``DynamicLossScaler.update_scale`` runs it on these
attributes. The engine's fp16 training uses ds-zero's scaler directly; these classes are for
scripts and checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch

from ds_zero import DynamicLossScaler as _ZeroDynamicLossScaler
from ds_zero import LossScaleOptions

__all__ = [
    "CONSECUTIVE_HYSTERESIS",
    "DELAYED_SHIFT",
    "INITIAL_LOSS_SCALE",
    "LOSS_SCALE_PROFILE_DEFAULTS",
    "MIN_LOSS_SCALE",
    "SCALE_WINDOW",
    "CreateLossScaler",
    "DynamicLossScaler",
    "LossScaleProfile",
    "LossScaleProfileDefaults",
    "LossScaler",
    "LossScalerBase",
    "to_python_float",
]

# the keys of ``dynamic_loss_args`` (DeepSpeed's)
INITIAL_LOSS_SCALE = "init_scale"
SCALE_WINDOW = "scale_window"
DELAYED_SHIFT = "delayed_shift"
CONSECUTIVE_HYSTERESIS = "consecutive_hysteresis"
MIN_LOSS_SCALE = "min_scale"


class LossScaleProfile(str, Enum):
    FUSED = "fused"
    UNFUSED = "unfused"


@dataclass(frozen=True)
class LossScaleProfileDefaults:
    initial_dynamic_scale: float
    default_scale_window: int
    default_min_loss_scale: float
    scale_factor: float


#: DeepSpeed's defaults per optimizer profile
LOSS_SCALE_PROFILE_DEFAULTS = {
    LossScaleProfile.FUSED: LossScaleProfileDefaults(2.0**32, 1000, 1, 2.0),
    LossScaleProfile.UNFUSED: LossScaleProfileDefaults(2.0**16, 1000, 0.25, 2.0),
}


def to_python_float(t: Any) -> float:
    return t.item() if hasattr(t, "item") else t[0]


class LossScalerBase:
    """A scale and how to apply it (DeepSpeed's base class)."""

    cur_scale: float
    dynamic: bool

    def __init__(self, cur_scale: float) -> None:
        self.cur_scale = cur_scale
        self.dynamic = False

    @property
    def loss_scale(self) -> float:
        return self.cur_scale

    def scale_gradient(self, module: Any, grad_in: tuple, grad_out: tuple) -> tuple:
        del module, grad_out
        return tuple(self.loss_scale * g for g in grad_in)

    def update_scale(self, overflow: bool) -> None:
        del overflow  # a static scale stays

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.loss_scale

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        self.scale_loss(loss).backward(retain_graph=retain_graph)


class LossScaler(LossScalerBase):
    """A static scale (``scale``); it never reports an overflow."""

    def __init__(self, scale: float = 1) -> None:
        super().__init__(scale)

    def has_overflow(self, params: Any) -> bool:
        del params
        return False

    @staticmethod
    def _has_inf_or_nan(x: torch.Tensor) -> bool:
        del x
        return False


class DynamicLossScaler(LossScalerBase):
    """DeepSpeed's dynamic scaler: ``DynamicLossScaler(init_scale, scale_window, min_scale,
    delayed_shift, consecutive_hysteresis, raise_error_at_min_scale=True, dtype=torch.half)``;
    the scale is divided by 2 on an overflow once ``delayed_shift`` overflows have used up the
    hysteresis, and doubled after ``scale_window`` clean steps."""

    cur_iter: int
    last_overflow_iter: int
    scale_factor: float
    scale_window: int
    min_scale: float
    delayed_shift: int
    cur_hysteresis: int
    consecutive_hysteresis: bool
    raise_error_at_min_scale: bool
    dtype: torch.dtype

    def __init__(
        self,
        init_scale: float,
        scale_window: int,
        min_scale: float,
        delayed_shift: int,
        consecutive_hysteresis: bool,
        raise_error_at_min_scale: bool = True,
        dtype: torch.dtype = torch.half,
    ) -> None:
        super().__init__(init_scale)
        self.cur_iter = 0
        self.last_overflow_iter = -1
        self.scale_factor = 2.0
        self.scale_window = scale_window
        self.min_scale = min_scale
        self.delayed_shift = delayed_shift
        self.cur_hysteresis = delayed_shift
        self.consecutive_hysteresis = consecutive_hysteresis
        self.raise_error_at_min_scale = raise_error_at_min_scale
        self.dynamic = True
        self.dtype = dtype
        self._schedule()  # bad arguments fail here, naming the option

    def _schedule(self) -> _ZeroDynamicLossScaler:
        """ds-zero's scaler holding this one's state (rebuilt per call: the state lives in
        DeepSpeed's attributes above, which a pickled DeepSpeed scaler restores)."""
        scaler = _ZeroDynamicLossScaler(
            LossScaleOptions(
                loss_scale_window=int(self.scale_window),
                hysteresis=int(self.delayed_shift),
                consecutive_hysteresis=bool(self.consecutive_hysteresis),
                min_loss_scale=float(self.min_scale),
                scale_factor=float(self.scale_factor),
                raise_error_at_min_scale=bool(self.raise_error_at_min_scale),
            )
        )
        scaler.load_state_dict({
            "scale": self.cur_scale, "hysteresis_left": self.cur_hysteresis,
            "iteration": self.cur_iter, "last_overflow_iteration": self.last_overflow_iter,
        })  # fmt: skip
        return scaler

    def has_overflow_serial(self, params: Any) -> bool:
        return any(p.grad is not None and self._has_inf_or_nan(p.grad.data) for p in params)

    def has_overflow(self, params: Any) -> bool:
        return self.has_overflow_serial(params)

    @staticmethod
    def _has_inf_or_nan(x: torch.Tensor) -> bool:
        return x.numel() > 0 and not bool(torch.isfinite(x).all())

    def update_scale(self, overflow: bool) -> None:
        scaler = self._schedule()
        scaler.update(bool(overflow))
        state = scaler.state_dict()
        self.cur_scale = state["scale"]
        self.cur_hysteresis = int(state["hysteresis_left"])
        self.cur_iter = int(state["iteration"])
        self.last_overflow_iter = int(state["last_overflow_iteration"])


def CreateLossScaler(  # noqa: N802 - DeepSpeed's name
    dtype: torch.dtype,
    static_loss_scale: float,
    dynamic_scaling: bool,
    dynamic_loss_args: dict[str, Any] | None,
) -> LossScalerBase:
    """fp16 with dynamic scaling: a ``DynamicLossScaler`` from ``dynamic_loss_args`` (its
    keyword arguments); otherwise a static scale (``static_loss_scale`` for fp16, 1 else)."""
    if dtype == torch.half and dynamic_scaling:
        if dynamic_loss_args is None:
            raise ValueError(
                "CreateLossScaler: dynamic fp16 scaling needs dynamic_loss_args (init_scale, "
                "scale_window, min_scale, delayed_shift, consecutive_hysteresis)"
            )
        return DynamicLossScaler(dtype=dtype, **dynamic_loss_args)
    return LossScaler(scale=static_loss_scale if dtype == torch.half else 1.0)
