"""Progressive layer drop: the keep-probability schedule the model reads as ``pld_theta``."""

from __future__ import annotations

import logging

import numpy as np

__all__ = ["ProgressiveLayerDrop"]

_log = logging.getLogger(__name__)


class ProgressiveLayerDrop:
    """Progressive Layer Dropping (Zhang & He, 2020), DeepSpeed's schedule and method names.

    The keep probability starts at 1 and decays towards ``theta``:
    ``theta_t = (1 - theta) * exp(-gamma * t) + theta``. The engine calls ``update_state(step)``
    at each optimizer step and passes ``get_state()`` (``progressive_layer_drop=True`` and
    ``pld_theta``) as keyword arguments to the model's forward while training; the model decides
    which layers to skip (each layer ``i`` of ``L`` kept with probability
    ``1 - i / L * (1 - pld_theta)`` in the paper's BERT).

    Args:
        theta: the final keep probability; lower trains faster and drops more (DeepSpeed's
            default 0.5 here, 1.0 when read from the config section without ``theta``).
        gamma: how fast the keep probability falls (default 0.001).
    """

    theta: float
    gamma: float
    current_theta: float

    def __init__(self, theta: float = 0.5, gamma: float = 0.001) -> None:
        for name, value in (("theta", theta), ("gamma", gamma)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"progressive_layer_drop '{name}' must be a number, got {value!r}")
        if not 0.0 <= theta <= 1.0:
            raise ValueError(
                f"progressive_layer_drop 'theta' is a probability in [0, 1], got {theta}"
            )
        if gamma < 0:
            raise ValueError(f"progressive_layer_drop 'gamma' must be >= 0, got {gamma}")
        self.theta = theta
        self.gamma = gamma
        self.current_theta = 1.0
        _log.info("progressive layer drop enabled (theta = %s, gamma = %s)", theta, gamma)

    def get_state(self) -> dict[str, object]:
        """The keyword arguments the engine adds to the model's training forward."""
        return {"progressive_layer_drop": True, "pld_theta": self.get_theta()}

    def get_theta(self) -> float:
        return self.current_theta

    def update_state(self, global_step: int) -> None:
        # numpy's exp, as DeepSpeed's, so the values are bit-for-bit the same.
        decay = float(np.exp(-self.gamma * global_step))
        self.current_theta = (1.0 - self.theta) * decay + self.theta

    def state_dict(self) -> dict[str, float]:
        return {"theta": self.theta, "gamma": self.gamma, "current_theta": self.current_theta}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.theta = float(state["theta"])
        self.gamma = float(state["gamma"])
        self.current_theta = float(state["current_theta"])
