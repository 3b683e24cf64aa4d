"""DeepSpeed's learning-rate schedules with DeepSpeed's parameter names and curves.

Each schedule is stepped once per optimizer step (``step()`` after the batch) and stores only
``last_batch_iteration``, so its state dict is one integer. ``get_lr()`` returns one value per
parameter group.
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

from ds_all._config_base import ConfigError
from ds_all._scheduler_params import check_scheduler_params

log = logging.getLogger("ds_all")

WARMUP_LOG_RATE = "log"
WARMUP_LINEAR_RATE = "linear"


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    # Engines and ZeRO wrappers keep the real optimizer in `.optimizer`.
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, torch.optim.Optimizer):
        return inner
    if hasattr(optimizer, "param_groups"):
        return optimizer  # duck-typed optimizer (ZeRO partition optimizers expose param_groups)
    raise TypeError(f"{type(optimizer).__name__} is not a torch.optim.Optimizer")


def _per_group(optimizer: Any, value: float | Sequence[float], name: str) -> list[float]:
    n = len(optimizer.param_groups)
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConfigError(f"scheduler.params.{name}: expected {n} values (one per parameter "
                             f"group), got {len(value)}")  # fmt: skip
        return [float(v) for v in value]
    return [float(value)] * n


def _set_lrs(optimizer: Any, lrs: list[float]) -> list[float]:
    for group, lr in zip(optimizer.param_groups, lrs):
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)  # tensor lrs (capturable optimizers) are updated in place
        else:
            group["lr"] = lr
    return [float(g["lr"]) for g in optimizer.param_groups]


def _check_warmup(warmup_num_steps: Any, warmup_type: str) -> str:
    if not isinstance(warmup_num_steps, int) or warmup_num_steps <= 0:
        raise ConfigError(f"scheduler.params.warmup_num_steps must be a positive integer, got "
                         f"{warmup_num_steps!r}")  # fmt: skip
    if warmup_type not in (WARMUP_LOG_RATE, WARMUP_LINEAR_RATE):
        raise ConfigError(f"scheduler.params.warmup_type must be 'log' or 'linear', got "
                         f"{warmup_type!r}")  # fmt: skip
    return warmup_type


class _Schedule:
    """Shared stepping and state handling."""

    optimizer: Any
    last_batch_iteration: int
    _last_lr: list[float] | None = None

    def get_lr(self) -> list[float]:
        raise NotImplementedError

    def step(self, last_batch_iteration: int | None = None) -> None:
        if last_batch_iteration is None:
            last_batch_iteration = self.last_batch_iteration + 1
        self.last_batch_iteration = last_batch_iteration
        self._last_lr = _set_lrs(self.optimizer, self.get_lr())

    def get_last_lr(self) -> list[float]:
        if self._last_lr is None:
            raise RuntimeError("get_last_lr(): call step() first")
        return self._last_lr

    def state_dict(self) -> dict[str, int]:
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, sd: dict[str, int]) -> None:
        self.last_batch_iteration = int(sd["last_batch_iteration"])


class WarmupLR(_Schedule):
    """From warmup_min_lr to warmup_max_lr over warmup_num_steps (log or linear), then flat."""

    def __init__(
        self,
        optimizer: Any,
        warmup_min_lr: float | Sequence[float] = 0.0,
        warmup_max_lr: float | Sequence[float] | None = 0.001,
        warmup_num_steps: int = 1000,
        warmup_type: str = WARMUP_LOG_RATE,
        last_batch_iteration: int = -1,
    ) -> None:
        self.optimizer = _torch_optimizer(optimizer)
        self.warmup_type = _check_warmup(warmup_num_steps, warmup_type)
        if warmup_max_lr is None:
            warmup_max_lr = [g["lr"] for g in self.optimizer.param_groups]
        self.min_lrs = _per_group(self.optimizer, warmup_min_lr, "warmup_min_lr")
        self.max_lrs = _per_group(self.optimizer, warmup_max_lr, "warmup_max_lr")
        self.delta_lrs = [hi - lo for hi, lo in zip(self.max_lrs, self.min_lrs)]
        # log(1) = 0 would divide by zero; DeepSpeed clamps the warmup to at least 2 steps.
        self.warmup_num_steps = max(2, warmup_num_steps)
        self.inverse_log_warm_up = 1.0 / math.log(self.warmup_num_steps)
        self.last_batch_iteration = last_batch_iteration
        if last_batch_iteration == -1:
            self._last_lr = _set_lrs(self.optimizer, self.get_lr())

    def _warmup_gamma(self) -> float:
        if self.warmup_type == WARMUP_LOG_RATE:
            return self.inverse_log_warm_up * math.log(self.last_batch_iteration + 1)
        return self.last_batch_iteration / self.warmup_num_steps

    def _gamma(self) -> float:
        if self.last_batch_iteration < self.warmup_num_steps:
            return self._warmup_gamma()
        return 1.0

    def get_lr(self) -> list[float]:
        if self.last_batch_iteration < 0:
            return list(self.min_lrs)
        gamma = self._gamma()
        return [lo + d * gamma for lo, d in zip(self.min_lrs, self.delta_lrs)]


class WarmupDecayLR(WarmupLR):
    """WarmupLR, then linear decay to zero at total_num_steps."""

    def __init__(
        self,
        optimizer: Any,
        total_num_steps: int,
        warmup_min_lr: float | Sequence[float] = 0.0,
        warmup_max_lr: float | Sequence[float] | None = 0.001,
        warmup_num_steps: int = 1000,
        warmup_type: str = WARMUP_LOG_RATE,
        last_batch_iteration: int = -1,
    ) -> None:
        if not isinstance(total_num_steps, int) or total_num_steps <= 0:
            raise ConfigError(f"scheduler.params.total_num_steps must be a positive integer, got "
                             f"{total_num_steps!r}")  # fmt: skip
        self.total_num_steps = total_num_steps
        super().__init__(optimizer, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type,
                         last_batch_iteration)  # fmt: skip
        if total_num_steps < self.warmup_num_steps:
            log.warning("WarmupDecayLR: total_num_steps %d is less than warmup_num_steps %d",
                        total_num_steps, warmup_num_steps)  # fmt: skip

    def _gamma(self) -> float:
        if self.last_batch_iteration < self.warmup_num_steps:
            return self._warmup_gamma()
        remaining = float(self.total_num_steps - self.last_batch_iteration)
        return max(0.0, remaining / float(max(1.0, self.total_num_steps - self.warmup_num_steps)))


class WarmupCosineLR(_Schedule):
    """Ratio of each group's base lr: warmup from warmup_min_ratio to 1, then cosine down to
    cos_min_ratio at total_num_steps, flat after."""

    def __init__(
        self,
        optimizer: Any,
        total_num_steps: int,
        warmup_min_ratio: float = 0.0,
        warmup_num_steps: int = 1000,
        cos_min_ratio: float = 0.0001,
        warmup_type: str = WARMUP_LOG_RATE,
        last_batch_iteration: int = -1,
    ) -> None:
        self.optimizer = _torch_optimizer(optimizer)
        self.warmup_type = _check_warmup(warmup_num_steps, warmup_type)
        if not isinstance(total_num_steps, int) or total_num_steps <= 0:
            raise ConfigError(f"scheduler.params.total_num_steps must be a positive integer, got "
                             f"{total_num_steps!r}")  # fmt: skip
        self.total_num_steps = total_num_steps
        self.warmup_min_ratio = float(warmup_min_ratio)
        self.cos_min_ratio = float(cos_min_ratio)
        self.warmup_num_steps = max(2, warmup_num_steps)
        self.inverse_log_warm_up = 1.0 / math.log(self.warmup_num_steps)
        self.org_lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
        self.last_batch_iteration = last_batch_iteration
        if last_batch_iteration == -1:
            self._last_lr = _set_lrs(self.optimizer, self.get_lr())

    def get_lr_ratio(self) -> float:
        it = self.last_batch_iteration
        if it < 0:
            return 0.0
        if it < self.warmup_num_steps:
            if self.warmup_type == WARMUP_LOG_RATE:
                ratio = self.inverse_log_warm_up * math.log(it + 1)
            else:
                ratio = it / self.warmup_num_steps
            return self.warmup_min_ratio + ratio * (1.0 - self.warmup_min_ratio)
        done = it - self.warmup_num_steps + 1
        span = max(1, self.total_num_steps - self.warmup_num_steps)
        # Clamped so the ratio stays at the floor past the end instead of rising again.
        progress = min(1.0, done / span)
        cosine = (1.0 + math.cos(math.pi * progress)) / 2.0
        return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * cosine)

    def get_lr(self) -> list[float]:
        if self.last_batch_iteration < 0:
            return [0.0 for _ in self.org_lrs]
        ratio = self.get_lr_ratio()
        return [lr * ratio for lr in self.org_lrs]


class LRRangeTest(_Schedule):
    """lr = min_lr * (1 + step_rate * interval), interval = (it + 1) / step_size (floored with
    staircase): the learning-rate range test of Smith (2018)."""

    def __init__(
        self,
        optimizer: Any,
        lr_range_test_min_lr: float | Sequence[float] = 1e-3,
        lr_range_test_step_size: int = 2000,
        lr_range_test_step_rate: float = 1.0,
        lr_range_test_staircase: bool = False,
        last_batch_iteration: int = -1,
    ) -> None:
        self.optimizer = _torch_optimizer(optimizer)
        if lr_range_test_step_size <= 0:
            raise ConfigError("scheduler.params.lr_range_test_step_size must be positive, got "
                             f"{lr_range_test_step_size!r}")  # fmt: skip
        self.min_lr = _per_group(self.optimizer, lr_range_test_min_lr, "lr_range_test_min_lr")
        self.step_size = lr_range_test_step_size
        self.step_rate = float(lr_range_test_step_rate)
        self.staircase = bool(lr_range_test_staircase)
        self.last_batch_iteration = last_batch_iteration
        if last_batch_iteration == -1:
            self._last_lr = _set_lrs(self.optimizer, list(self.min_lr))

    def _interval(self) -> float:
        x = float(self.last_batch_iteration + 1) / self.step_size
        return math.floor(x) if self.staircase else x

    def get_lr(self) -> list[float]:
        increase = 1.0 + self.step_rate * self._interval()
        return [lr * increase for lr in self.min_lr]


class OneCycle(_Schedule):
    """1Cycle: lr up from cycle_min_lr to cycle_max_lr over cycle_first_step_size, down over
    cycle_second_step_size (optionally in stairs), then decayed; momentum (beta1) cycles the
    opposite way when cycle_momentum and the optimizer has betas."""

    def __init__(
        self,
        optimizer: Any,
        cycle_min_lr: float,
        cycle_max_lr: float,
        decay_lr_rate: float = 0.0,
        cycle_first_step_size: int = 2000,
        cycle_second_step_size: int | None = None,
        cycle_first_stair_count: int = 0,
        cycle_second_stair_count: int | None = None,
        decay_step_size: int = 0,
        cycle_momentum: bool = True,
        cycle_min_mom: float = 0.8,
        cycle_max_mom: float = 0.9,
        decay_mom_rate: float = 0.0,
        last_batch_iteration: int = -1,
    ) -> None:
        self.optimizer = _torch_optimizer(optimizer)
        if cycle_first_step_size <= 0:
            raise ConfigError("scheduler.params.cycle_first_step_size must be positive")
        first = float(cycle_first_step_size)
        second = float(cycle_second_step_size) if cycle_second_step_size is not None else first
        self.first_step_size, self.second_step_size = first, second
        self.total_size = first + second
        self.step_ratio = first / self.total_size
        self.first_stair_count = cycle_first_stair_count
        self.second_stair_count = (
            cycle_first_stair_count
            if cycle_second_stair_count is None
            else cycle_second_stair_count
        )
        self.decay_step_size = decay_step_size
        n = len(self.optimizer.param_groups)
        self.min_lrs = [float(cycle_min_lr)] * n
        self.max_lrs = [float(cycle_max_lr)] * n
        self.decay_lr_rate = float(decay_lr_rate)
        no_decay = math.isclose(decay_step_size, 0)
        self.skip_lr_decay = no_decay or math.isclose(self.decay_lr_rate, 0)
        if last_batch_iteration == -1:
            _set_lrs(self.optimizer, list(self.min_lrs))
        self.cycle_momentum = cycle_momentum and "betas" in getattr(self.optimizer, "defaults", {})
        if cycle_momentum and not self.cycle_momentum:
            log.warning("OneCycle: cycle_momentum disabled: %s has no betas",
                        type(self.optimizer).__name__)  # fmt: skip
        self.decay_mom_rate = float(decay_mom_rate)
        self.skip_mom_decay = no_decay or math.isclose(self.decay_mom_rate, 0)
        # beta2 is held at 0.99 while beta1 cycles, as DeepSpeed does.
        self.min_moms = [(float(cycle_min_mom), 0.99)] * n
        self.max_moms = [(float(cycle_max_mom), 0.99)] * n
        if self.cycle_momentum and last_batch_iteration == -1:
            for group, mom in zip(self.optimizer.param_groups, self.min_moms):
                group["betas"] = mom
        self.last_batch_iteration = last_batch_iteration

    def _scale_factor(self) -> float:
        it = self.last_batch_iteration + 1
        cycle = math.floor(1 + it / self.total_size)
        x = 1.0 + it / self.total_size - cycle
        if x <= self.step_ratio:
            scale, stairs = x / self.step_ratio, self.first_stair_count
        else:
            scale, stairs = (x - 1) / (self.step_ratio - 1), self.second_stair_count
        if stairs > 0:
            # Quantised from the integer offset: the float scale can land just below a stair.
            pos = it % self.total_size
            if pos <= self.first_step_size:
                stair = pos * stairs / self.first_step_size
            else:
                stair = (self.total_size - pos) * stairs / self.second_step_size
            scale = math.floor(stair) / stairs
        return scale

    def get_lr(self) -> list[float]:
        if self.last_batch_iteration < self.total_size:
            s = self._scale_factor()
            return [lo + (hi - lo) * s for lo, hi in zip(self.min_lrs, self.max_lrs)]
        if self.skip_lr_decay:
            return list(self.min_lrs)
        interval = (self.last_batch_iteration - self.total_size + 1) / self.decay_step_size
        return [lo / (1 + self.decay_lr_rate * interval) for lo in self.min_lrs]

    def get_mom(self) -> list[tuple[float, float]] | None:
        if not self.cycle_momentum:
            return None
        if self.last_batch_iteration < self.total_size:
            s = self._scale_factor()
            return [
                (hi[0] - (hi[0] - lo[0]) * s, lo[1]) for lo, hi in zip(self.min_moms, self.max_moms)
            ]
        if self.skip_mom_decay:
            return list(self.max_moms)
        interval = (self.last_batch_iteration - self.total_size + 1) / self.decay_step_size
        return [(b0 * (1 + self.decay_mom_rate * interval), b1) for b0, b1 in self.max_moms]

    def step(self, last_batch_iteration: int | None = None) -> None:
        super().step(last_batch_iteration)
        moms = self.get_mom()
        if moms is not None:
            for group, mom in zip(self.optimizer.param_groups, moms):
                group["betas"] = mom


SCHEDULERS: dict[str, type[_Schedule]] = {
    "WarmupLR": WarmupLR,
    "WarmupDecayLR": WarmupDecayLR,
    "WarmupCosineLR": WarmupCosineLR,
    "OneCycle": OneCycle,
    "LRRangeTest": LRRangeTest,
}


def resolve_scheduler(name: str, params: dict[str, Any],
                      partial: bool = False) -> tuple[type[_Schedule], dict[str, Any]]:  # fmt: skip
    """The schedule class named ``name`` and its checked parameters (ConfigError naming the
    key: unknown name or key, wrong kind, out of range, contradicting another parameter).
    ``partial``: some parameters are still to be filled in; check only the ones given."""
    if name not in SCHEDULERS:
        near = difflib.get_close_matches(str(name), list(SCHEDULERS), n=1)
        hint = f" did you mean {near[0]!r}?" if near else ""
        raise ConfigError(
            f"scheduler.type {name!r} is not a known schedule ({', '.join(SCHEDULERS)});{hint}"
        )
    cls = SCHEDULERS[name]
    return cls, check_scheduler_params(name, cls, params, partial)


def build_scheduler(name: str, optimizer: Any, params: dict[str, Any]) -> _Schedule:
    """A schedule from the config's ``scheduler {type, params}``; errors name the bad key."""
    cls, kwargs = resolve_scheduler(name, params)
    return cls(optimizer, **kwargs)
