"""Difficulty schedules of curriculum learning, with DeepSpeed's ``CurriculumScheduler`` API.

One scheduler serves both DeepSpeed sections that use it: the legacy top-level
``curriculum_learning`` (the engine passes the difficulty to the model as ``curriculum_seqlen``)
and each metric of ``data_efficiency.data_sampling.curriculum_learning.curriculum_metrics``
(the sampler draws the samples whose difficulty is at most the current one).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

from ._errors import DataConfigError

__all__ = ["CurriculumScheduler", "SCHEDULE_TYPES"]

_log = logging.getLogger(__name__)

#: The schedule types DeepSpeed accepts, in its spelling.
SCHEDULE_TYPES = ("fixed_linear", "fixed_root", "fixed_discrete", "custom")

# Keys of the scheduler's state dict; DeepSpeed's names, so a checkpoint's state reads either way.
_MIN = "min_difficulty"
_MAX = "max_difficulty"
_CURRENT = "current_difficulty"
_TYPE = "schedule_type"
_SCHEDULE = "schedule_config"


def _require(mapping: Mapping[str, Any], key: str, where: str, fix: str) -> Any:
    if not isinstance(mapping, Mapping) or key not in mapping:
        raise DataConfigError(f"{where} needs '{key}': {fix}")
    return mapping[key]


def _check_int(value: Any, key: str, *, positive: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataConfigError(f"curriculum '{key}' must be an integer, got {value!r}")
    if positive and value <= 0:
        raise DataConfigError(f"curriculum '{key}' must be > 0, got {value}")
    return value


class CurriculumScheduler:
    """Difficulty as a function of the global step, DeepSpeed 0.19.8's schedules and state.

    ``config`` is the dict DeepSpeed takes: ``min_difficulty``, ``max_difficulty``,
    ``schedule_type`` and (except for ``custom``) ``schedule_config``:

    - ``fixed_linear``: ``{"total_curriculum_step": N, "difficulty_step": d}``; the difficulty
      grows linearly from min to max over N steps, floored to a multiple of ``d``.
    - ``fixed_root``: the same plus ``"root_degree": r``; grows as ``(step / N) ** (1 / r)``.
    - ``fixed_discrete``: ``{"difficulty": [d0, d1, ...], "max_step": [s0, ...]}`` with one
      ``max_step`` fewer than difficulties; ``d_i`` up to and including step ``s_i``.
    - ``custom``: ``set_custom_get_difficulty(fn)`` supplies ``fn(global_step) -> difficulty``.

    Once the current difficulty reaches ``max_difficulty`` it stays there (DeepSpeed's rule:
    ``update_difficulty`` stops asking the schedule).
    """

    state: dict[str, Any]
    custom_get_difficulty: Callable[[int], Any] | None

    def __init__(self, config: Mapping[str, Any]) -> None:
        where = "curriculum learning"
        fix_minmax = "set the easiest and the hardest difficulty (for seqlen: token counts)"
        lo = _require(config, _MIN, where, fix_minmax)
        hi = _require(config, _MAX, where, fix_minmax)
        kind = _require(config, _TYPE, where, f"one of {', '.join(SCHEDULE_TYPES)}")
        if kind not in SCHEDULE_TYPES:
            raise DataConfigError(
                f"curriculum 'schedule_type' {kind!r} is not supported; use one of "
                f"{', '.join(SCHEDULE_TYPES)}"
            )
        for key, value in ((_MIN, lo), (_MAX, hi)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DataConfigError(f"curriculum '{key}' must be a number, got {value!r}")
        self.custom_get_difficulty = None
        self.state = {_MIN: lo, _MAX: hi, _CURRENT: lo, _TYPE: kind}
        if kind == "custom":
            return
        schedule = _require(config, _SCHEDULE, where, f"the '{kind}' schedule's parameters")
        if kind == "fixed_discrete":
            fix = "'difficulty' lists the levels and 'max_step' the last step of each but the last"
            levels = _require(schedule, "difficulty", "fixed_discrete schedule_config", fix)
            steps = _require(schedule, "max_step", "fixed_discrete schedule_config", fix)
            if not isinstance(levels, list) or not isinstance(steps, list) or not steps:
                raise DataConfigError(f"fixed_discrete schedule_config: non-empty lists; {fix}")
            if len(levels) != len(steps) + 1:
                raise DataConfigError(
                    f"fixed_discrete schedule_config: 'difficulty' needs exactly one entry more "
                    f"than 'max_step' (got {len(levels)} and {len(steps)}): the last difficulty "
                    f"holds for every later step"
                )
        else:
            fix = "steps to reach max_difficulty and the granularity of the difficulty"
            _check_int(_require(schedule, "total_curriculum_step", f"{kind} schedule_config", fix),
                       "total_curriculum_step", positive=True)  # fmt: skip
            step = _require(schedule, "difficulty_step", f"{kind} schedule_config", fix)
            _check_int(step, "difficulty_step", positive=True)
            if kind == "fixed_root":
                degree = _require(schedule, "root_degree", "fixed_root schedule_config",
                                  "2 for a square root, 3 for a cube root")  # fmt: skip
                if isinstance(degree, bool) or not isinstance(degree, (int, float)) or degree <= 0:
                    raise DataConfigError(
                        f"'root_degree' must be a positive number, got {degree!r}"
                    )
            if step % 8 != 0:
                # Same advice as DeepSpeed: a seqlen difficulty off a multiple of 8 (16 for int8)
                # leaves Tensor Cores idle.
                _log.warning(
                    "curriculum difficulty_step %s is not a multiple of 8: with the seqlen metric "
                    "fp16 Tensor Cores need multiples of 8 (int8: 16); ignore for other metrics",
                    step,
                )
        self.state[_SCHEDULE] = schedule

    # DeepSpeed's public methods -------------------------------------------------------------
    def get_current_difficulty(self) -> Any:
        return self.state[_CURRENT]

    def set_current_difficulty(self, difficulty: Any) -> None:
        self.state[_CURRENT] = difficulty

    def set_custom_get_difficulty(self, schedule_function: Callable[[int], Any]) -> None:
        self.custom_get_difficulty = schedule_function

    def get_state(self) -> dict[str, Any]:
        return self.state

    def set_state(self, state: dict[str, Any]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state (JSON-serialisable when the schedule config is)."""
        return dict(self.state)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.state = dict(state_dict)

    def get_difficulty(self, global_steps: int) -> Any:
        kind = self.state[_TYPE]
        if kind == "fixed_discrete":
            return self._discrete(global_steps)
        if kind == "fixed_linear":
            return self._root(global_steps, 1)
        if kind == "fixed_root":
            return self._root(global_steps, self.state[_SCHEDULE]["root_degree"])
        if self.custom_get_difficulty is None:
            raise DataConfigError(
                "curriculum schedule_type 'custom' needs a schedule function: call "
                "set_custom_get_difficulty(fn) (engine.set_custom_curriculum_learning_schedule "
                "for the data sampler) before training"
            )
        return self.custom_get_difficulty(global_steps)

    def update_difficulty(self, global_steps: int) -> Any:
        """Advance to ``global_steps`` and return the difficulty to use for it."""
        if self.state[_CURRENT] < self.state[_MAX]:
            self.state[_CURRENT] = self.get_difficulty(global_steps)
        return self.state[_CURRENT]

    # Schedules --------------------------------------------------------------------------------
    def _discrete(self, global_steps: int) -> Any:
        schedule = self.state[_SCHEDULE]
        levels, max_steps = schedule["difficulty"], schedule["max_step"]
        if global_steps > max_steps[-1]:
            return levels[-1]
        for level, last in zip(levels, max_steps):
            if global_steps <= last:
                return level
        return levels[-1]

    def _root(self, global_steps: int, degree: float) -> int:
        schedule = self.state[_SCHEDULE]
        lo, hi = self.state[_MIN], self.state[_MAX]
        step = schedule["difficulty_step"]
        fraction = (float(global_steps) / schedule["total_curriculum_step"]) ** (1.0 / degree)
        value = math.floor(fraction * (hi - lo) + lo)
        value -= value % step
        # Rounding down to the step can fall below min_difficulty (min 8, step 16 gives 0: an
        # empty sequence); DeepSpeed 0.19.8 raises it to the first multiple of the step at or
        # above the minimum, so the difficulty stays a multiple of the step.
        value = max(value, -(-lo // step) * step)
        return min(value, hi)
