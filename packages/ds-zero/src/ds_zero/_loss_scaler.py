"""Loss scaling for fp16: static, or dynamic with DeepSpeed's window/hysteresis semantics.

The scaler only decides the scale; detecting an overflow (a non-finite global gradient norm,
agreed by every rank through one all-reduce) is the optimizer wrapper's job, so a skipped step
is skipped on every rank with parameters unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LossScaleOptions:
    """``loss_scale == 0`` means dynamic scaling (DeepSpeed's ``fp16`` section convention)."""

    loss_scale: float = 0.0
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    consecutive_hysteresis: bool = False
    min_loss_scale: float = 1.0
    scale_factor: float = 2.0

    def __post_init__(self) -> None:
        if self.loss_scale < 0:
            raise ValueError(f"loss_scale must be >= 0 (0 = dynamic), got {self.loss_scale}")
        if self.loss_scale_window < 1:
            raise ValueError(f"loss_scale_window must be >= 1, got {self.loss_scale_window}")
        if self.hysteresis < 1:
            raise ValueError(f"hysteresis must be >= 1, got {self.hysteresis}")
        if self.min_loss_scale <= 0:
            raise ValueError(f"min_loss_scale must be > 0, got {self.min_loss_scale}")
        if self.scale_factor <= 1:
            raise ValueError(f"scale_factor must be > 1, got {self.scale_factor}")


class LossScaler:
    """Scale of 1 or a fixed scale; ``update`` is a no-op (overflowed steps are still skipped)."""

    dynamic = False

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = float(scale)

    def update(self, overflow: bool) -> None:
        del overflow

    def state_dict(self) -> dict[str, float]:
        return {"scale": self.scale}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.scale = float(state["scale"])


class DynamicLossScaler(LossScaler):
    """Halve on overflow (after ``hysteresis`` consecutive overflows), double after
    ``loss_scale_window`` overflow-free steps, never below ``min_loss_scale``."""

    dynamic = True

    def __init__(self, options: LossScaleOptions | None = None) -> None:
        self.options = options or LossScaleOptions()
        super().__init__(2.0**self.options.initial_scale_power)
        self.hysteresis_left = self.options.hysteresis
        self.iteration = 0
        self.last_overflow_iteration = -1

    def update(self, overflow: bool) -> None:
        o = self.options
        if overflow:
            if self.hysteresis_left <= 1:
                self.scale = max(self.scale / o.scale_factor, o.min_loss_scale)
            else:
                self.hysteresis_left -= 1
            self.last_overflow_iteration = self.iteration
        else:
            if o.consecutive_hysteresis:
                self.hysteresis_left = o.hysteresis
            if (self.iteration - self.last_overflow_iteration) % o.loss_scale_window == 0:
                if not o.consecutive_hysteresis:
                    self.hysteresis_left = o.hysteresis
                self.scale *= o.scale_factor
        self.iteration += 1

    def state_dict(self) -> dict[str, float]:
        return {
            "scale": self.scale,
            "hysteresis_left": self.hysteresis_left,
            "iteration": self.iteration,
            "last_overflow_iteration": self.last_overflow_iteration,
        }

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.scale = float(state["scale"])
        self.hysteresis_left = int(state["hysteresis_left"])
        self.iteration = int(state["iteration"])
        self.last_overflow_iteration = int(state["last_overflow_iteration"])


def make_loss_scaler(options: LossScaleOptions | None) -> LossScaler:
    """None -> no scaling (bf16/fp32); ``loss_scale > 0`` -> static; else dynamic."""
    if options is None:
        return LossScaler(1.0)
    if options.loss_scale > 0:
        return LossScaler(options.loss_scale)
    return DynamicLossScaler(options)
