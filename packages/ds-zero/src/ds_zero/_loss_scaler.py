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
    # DeepSpeed 0.19.8 builds its DynamicLossScaler with raise_error_at_min_scale=True: an
    # overflow with the scale already at min_loss_scale (and no hysteresis left) ends the run
    # instead of skipping steps forever
    raise_error_at_min_scale: bool = True

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
    """DeepSpeed 0.19.8's ``DynamicLossScaler.update_scale``, step for step: on overflow, spend
    one unit of ``hysteresis`` or, when none is left, divide the scale (never below
    ``min_loss_scale``; already at it raises, see ``raise_error_at_min_scale``); after
    ``loss_scale_window`` overflow-free steps *since the one following the last overflow*
    (DeepSpeed's ``stable_interval``), multiply it and refill hysteresis.
    ``consecutive_hysteresis`` refills hysteresis on every overflow-free step instead."""

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
            if o.hysteresis == 1 or self.hysteresis_left == 1:
                if self.scale == o.min_loss_scale and o.raise_error_at_min_scale:
                    raise FloatingPointError(
                        f"fp16 gradients overflowed with the loss scale already at "
                        f"min_loss_scale={o.min_loss_scale:g} (as DeepSpeed, the run stops here): "
                        "lower fp16.min_loss_scale, use bf16, or set "
                        "LossScaleOptions(raise_error_at_min_scale=False) to keep skipping steps"
                    )
                self.scale = max(self.scale / o.scale_factor, o.min_loss_scale)
            else:
                self.hysteresis_left -= 1
            self.last_overflow_iteration = self.iteration
        else:
            if o.consecutive_hysteresis:
                self.hysteresis_left = o.hysteresis
            # DeepSpeed counts the clean steps after the one that follows an overflow, so the
            # scale grows on the (window + 1)-th clean step after an overflow, and on clean
            # step number window + 1 of the run (iteration == window) when none happened yet
            stable = self.iteration - self.last_overflow_iteration - 1
            if stable > 0 and stable % o.loss_scale_window == 0:
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
