"""Values of ``scheduler.params`` checked against the schedule they configure, before any
optimizer exists (at config load) and again when the schedule is built: kinds (an integer step
count, a learning rate or a list of one per parameter group, a flag), ranges, and
contradictions between parameters (a decay that ends before its warmup does).

DeepSpeed only warns on ``total_num_steps < warmup_num_steps``: the schedule then decays from a
learning rate it never reached, which is a typo far more often than an intent, so it is an
error here.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable
from typing import Any

from ds_all._config_base import ConfigError

#: checkers by kind; each returns the normalised value or raises with the message tail
_Check = Callable[[str, Any], Any]


def _real(key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        got = (
            f"the string {v!r}; write the number without quotes" if isinstance(v, str) else repr(v)
        )
        raise ConfigError(f"{key}: expected a number, got {got}")
    if not math.isfinite(v):
        raise ConfigError(f"{key}: must be a finite number, got {v}")
    return float(v)


def _non_negative(key: str, v: Any) -> float:
    x = _real(key, v)
    if x < 0:
        raise ConfigError(f"{key} must be >= 0, got {v!r}")
    return x


def _ratio(key: str, v: Any) -> float:
    x = _real(key, v)
    if not 0.0 <= x <= 1.0:
        raise ConfigError(f"{key} must be in [0, 1] (a fraction of the optimizer's lr), got {v!r}")
    return x


def _momentum(key: str, v: Any) -> float:
    x = _real(key, v)
    if not 0.0 <= x < 1.0:
        raise ConfigError(f"{key} must be in [0, 1) (it becomes Adam's beta1), got {v!r}")
    return x


def _lr(key: str, v: Any) -> Any:
    """A learning rate, or a list of one per parameter group."""
    if isinstance(v, (list, tuple)):
        if not v:
            raise ConfigError(f"{key}: an empty list; give one number, or one per parameter group")
        return [_non_negative(f"{key}[{i}]", x) for i, x in enumerate(v)]
    return _non_negative(key, v)


def _lr_or_none(key: str, v: Any) -> Any:
    return None if v is None else _lr(key, v)


def _int(key: str, v: Any, low: int) -> int:
    # DeepSpeed's own check is isinstance(v, int): 8.0 is refused there as here
    what = {1: "a positive integer", 0: "a non-negative integer"}.get(low, f"an integer >= {low}")
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ConfigError(f"{key} must be {what}, got {v!r}")
    return v


def _positive_int(key: str, v: Any) -> int:
    return _int(key, v, 1)


def _count(key: str, v: Any) -> int:
    return _int(key, v, 0)


def _count_or_none(key: str, v: Any) -> Any:
    return None if v is None else _count(key, v)


def _steps(key: str, v: Any) -> float:
    """OneCycle's step sizes: DeepSpeed converts them with float(), so 2000.0 is fine."""
    return _non_negative(key, v)


def _iteration(key: str, v: Any) -> int:
    return _int(key, v, -1)


def _flag(key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{key}: expected true or false, got {v!r}")
    return v


def _warmup_type(key: str, v: Any) -> str:
    if v not in ("log", "linear"):
        raise ConfigError(f"{key} must be 'log' or 'linear', got {v!r}")
    return v


_KINDS: dict[str, _Check] = {
    "warmup_min_lr": _lr,
    "warmup_max_lr": _lr_or_none,
    "warmup_num_steps": _positive_int,
    "warmup_type": _warmup_type,
    "total_num_steps": _positive_int,
    "warmup_min_ratio": _ratio,
    "cos_min_ratio": _ratio,
    "lr_range_test_min_lr": _lr,
    "lr_range_test_step_size": _positive_int,
    "lr_range_test_step_rate": _non_negative,
    "lr_range_test_staircase": _flag,
    "cycle_min_lr": _lr,
    "cycle_max_lr": _lr,
    "decay_lr_rate": _non_negative,
    "cycle_first_step_size": _steps,
    "cycle_second_step_size": lambda k, v: None if v is None else _steps(k, v),
    "cycle_first_stair_count": _count,
    "cycle_second_stair_count": _count_or_none,
    "decay_step_size": _steps,
    "cycle_momentum": _flag,
    "cycle_min_mom": _momentum,
    "cycle_max_mom": _momentum,
    "decay_mom_rate": _non_negative,
    "last_batch_iteration": _iteration,
}


def _lowest(v: Any) -> float:
    return min(v) if isinstance(v, list) else v


def _highest(v: Any) -> float:
    return max(v) if isinstance(v, list) else v


def _contradictions(name: str, p: dict[str, Any], defaults: dict[str, Any]) -> None:
    def get(key: str) -> Any:
        return p.get(key, defaults.get(key))

    if name in ("WarmupDecayLR", "WarmupCosineLR"):
        total, warmup = get("total_num_steps"), get("warmup_num_steps")
        if total is not None and warmup is not None and total < warmup:
            raise ConfigError(
                f"scheduler.params.total_num_steps ({total}) is less than "
                f"scheduler.params.warmup_num_steps ({warmup}) for {name}: the schedule would "
                "end before its warmup does; raise total_num_steps to the number of optimizer "
                "steps of the run, or lower warmup_num_steps"
            )
    if name == "OneCycle":
        if p["cycle_first_step_size"] <= 0:
            raise ConfigError("scheduler.params.cycle_first_step_size must be > 0, got "
                              f"{p['cycle_first_step_size']!r}")  # fmt: skip
        lo, hi = get("cycle_min_lr"), get("cycle_max_lr")
        if isinstance(lo, list) or isinstance(hi, list):
            raise ConfigError("scheduler.params.cycle_min_lr / cycle_max_lr: OneCycle takes one "
                              "learning rate for every parameter group, not a list")  # fmt: skip
        if lo > hi:
            raise ConfigError(f"scheduler.params.cycle_min_lr ({lo}) is larger than "
                              f"scheduler.params.cycle_max_lr ({hi}); swap them")  # fmt: skip
        mlo, mhi = get("cycle_min_mom"), get("cycle_max_mom")
        if get("cycle_momentum") and mlo > mhi:
            raise ConfigError(f"scheduler.params.cycle_min_mom ({mlo}) is larger than "
                              f"scheduler.params.cycle_max_mom ({mhi}); swap them")  # fmt: skip
        if get("decay_step_size") == 0:
            for rate in ("decay_lr_rate", "decay_mom_rate"):
                if get(rate):
                    raise ConfigError(
                        f"scheduler.params.{rate} is {get(rate)} but decay_step_size is 0, so "
                        "OneCycle never decays after the cycle; set decay_step_size (steps per "
                        f"decay interval) or remove {rate}"
                    )
    if name == "LRRangeTest" and _lowest(get("lr_range_test_min_lr")) <= 0:
        raise ConfigError("scheduler.params.lr_range_test_min_lr must be > 0: the range test "
                          "multiplies it, so 0 stays 0")  # fmt: skip


def check_scheduler_params(name: str, cls: type, params: dict[str, Any],
                           partial: bool = False) -> dict[str, Any]:  # fmt: skip
    """Check ``params`` for the schedule ``cls`` (named ``name``); returns them normalised.
    Unknown and missing keys, kinds, ranges and contradictions are ConfigErrors naming the key.
    ``partial``: some keys are still to be filled in (a client resolves "auto" later), so
    missing keys and relations between keys are not checked yet."""
    sig = inspect.signature(cls.__init__).parameters
    accepted = [k for k in sig if k not in ("self", "optimizer")]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        hints = []
        for k in unknown:
            near = difflib.get_close_matches(k, sorted(accepted), n=1)
            hints.append(f"{k!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
        raise ConfigError(f"scheduler.params for {name}: unknown key(s) {', '.join(hints)}; "
                          f"accepted: {', '.join(sorted(accepted))}")  # fmt: skip
    defaults = {
        k: sig[k].default for k in accepted if sig[k].default is not inspect.Parameter.empty
    }
    missing = [k for k in accepted if k not in defaults and k not in params]
    if missing and not partial:
        raise ConfigError(f"scheduler.params.{missing[0]} is required for {name}; add it to the "
                          '"scheduler": {"params": {...}} section')  # fmt: skip
    out = dict(params)
    for key, value in params.items():
        check = _KINDS.get(key)
        if check is not None:
            out[key] = check(f"scheduler.params.{key}", value)
    if not partial:
        _contradictions(name, {**defaults, **out}, defaults)
    return out
