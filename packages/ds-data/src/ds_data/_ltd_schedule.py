"""random-LTD's schedule: how many tokens the dropping layers keep at each step."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ._errors import DataConfigError

__all__ = ["RandomLTDScheduler"]

# DeepSpeed's state keys (checkpoints carry them under 'random_ltd').
_MIN = "min_value"
_MAX = "max_value"
_CURRENT = "current_value"
_SCHEDULE = "schedule_config"
_TYPE = "schedule_type"
_CONSUMED = "consumed_layer_tokens"
_STEP = "current_steps"


def _need(config: Mapping[str, Any], key: str, where: str) -> Any:
    if not isinstance(config, Mapping) or key not in config:
        raise DataConfigError(f"random_ltd: {where} needs '{key}'")
    return config[key]


class RandomLTDScheduler:
    """Kept sequence length per step for random layerwise token dropping (DeepSpeed's class).

    ``config`` is the ``random_ltd`` section plus the batch sizes the engine adds:
    ``total_layer_num``, ``random_ltd_layer_num``, ``global_batch_size`` and
    ``random_ltd_schedule`` = ``{"min_value", "max_value", "schedule_type": "fixed_linear",
    "schedule_config": {"require_steps", "seq_per_step"}}``. The kept length grows linearly from
    ``min_value`` to ``max_value`` over ``require_steps`` steps in multiples of ``seq_per_step``;
    ``consumed_layer_tokens`` counts the layer-tokens trained (DeepSpeed's accounting).
    """

    model_layer_num: int
    random_ltd_layer_num: int
    global_batch_size: int
    config_schedule: Mapping[str, Any] | None
    state: dict[str, Any]

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.model_layer_num = _need(config, "total_layer_num", "the section")
        self.random_ltd_layer_num = _need(config, "random_ltd_layer_num", "the section")
        self.config_schedule = _need(config, "random_ltd_schedule", "the section")
        self.global_batch_size = _need(config, "global_batch_size", "the engine's config")
        if self.config_schedule is not None:
            for key in (_MIN, _MAX, _TYPE, _SCHEDULE):
                _need(self.config_schedule, key, "random_ltd_schedule")
            if self.config_schedule[_TYPE] != "fixed_linear":
                raise DataConfigError(
                    f"random_ltd schedule_type {self.config_schedule[_TYPE]!r} is not supported; "
                    f"DeepSpeed's only schedule is 'fixed_linear'"
                )
            for key in ("require_steps", "seq_per_step"):
                _need(self.config_schedule[_SCHEDULE], key, "random_ltd_schedule.schedule_config")
        lr_schedule = config.get("layer_token_lr_schedule", {})
        if isinstance(lr_schedule, Mapping) and lr_schedule.get("enabled", False):
            raise DataConfigError(
                "random_ltd.layer_token_lr_schedule is not implemented (DeepSpeed raises "
                "NotImplementedError too); set layer_token_lr_schedule.enabled to false"
            )
        self.state = {}
        self.reset_to_init()

    def reset_to_init(self) -> None:
        if self.config_schedule is not None:
            self.state[_MIN] = self.config_schedule[_MIN]
            self.state[_MAX] = self.config_schedule[_MAX]
            self.state[_CURRENT] = self.config_schedule[_MIN]
            self.state[_SCHEDULE] = self.config_schedule[_SCHEDULE]
            self.state[_TYPE] = self.config_schedule[_TYPE]
        self.state[_CONSUMED] = 0
        self.state[_STEP] = -1

    def get_value(self, global_steps: int) -> int:
        schedule = self.state[_SCHEDULE]
        lo, hi = self.state[_MIN], self.state[_MAX]
        value = math.floor(float(global_steps) / schedule["require_steps"] * (hi - lo) + lo)
        value -= value % schedule["seq_per_step"]
        return min(value, hi)

    def get_total_layer_tokens(self, train_iters: int) -> int:
        for step in range(train_iters):
            self.update_seq(step)
        return self.state[_CONSUMED]

    def get_current_seq(self) -> int:
        return self.state[_CURRENT]

    def set_current_seq(self, seq_length: int) -> None:
        self.state[_CURRENT] = seq_length

    def get_random_ltd_layer_num(self) -> int:
        return self.random_ltd_layer_num

    def get_state(self) -> dict[str, Any]:
        return self.state

    def set_state(self, state: dict[str, Any]) -> None:
        self.state = state

    def update_seq(self, global_steps: int) -> None:
        if self.state[_CURRENT] < self.state[_MAX]:
            self.state[_CURRENT] = self.get_value(global_steps)
        # Counted once per step even when the engine calls this for every micro-batch.
        if global_steps != self.state[_STEP]:
            kept = self.state[_CURRENT] * self.random_ltd_layer_num
            full = self.state[_MAX] * (self.model_layer_num - self.random_ltd_layer_num)
            self.state[_CONSUMED] += self.global_batch_size * (kept + full)
            self.state[_STEP] = global_steps

    def state_dict(self) -> dict[str, Any]:
        return {key: self.state[key] for key in (_CONSUMED, _STEP, _CURRENT, _MIN, _MAX)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        for key in (_CONSUMED, _STEP, _CURRENT, _MIN, _MAX):
            self.state[key] = state_dict[key]
