"""Values of ``optimizer.params`` checked before an optimizer is built, so that a bad value is a
ConfigError naming the key instead of an IndexError or TypeError from inside torch, or a run
that trains to NaN (``lr: Infinity`` passes torch's own ``lr >= 0`` check).

Two layers: the optimizer class's signature says what kind each parameter is (its default is a
float, an int, a bool or a tuple of floats), and the rules below give the ranges torch's and
ds-kernels' optimizers require for the parameters they share by name.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

from ds_all._config_base import ConfigError


@dataclass(frozen=True)
class _Range:
    """low <= value (or low < value when not low_closed), value < high (or <= when high_closed)."""

    low: float = 0.0
    high: float = math.inf
    low_closed: bool = True
    high_closed: bool = True

    def holds(self, v: float) -> bool:
        above = v >= self.low if self.low_closed else v > self.low
        below = v <= self.high if self.high_closed else v < self.high
        return above and below

    def text(self) -> str:
        lo = "[" if self.low_closed else "("
        hi = "]" if self.high_closed and math.isfinite(self.high) else ")"
        high = f"{self.high:g}" if math.isfinite(self.high) else "inf"
        return f"in {lo}{self.low:g}, {high}{hi}"


_NON_NEGATIVE = _Range()
_POSITIVE = _Range(low_closed=False)
_UNIT_OPEN = _Range(0.0, 1.0, high_closed=False)  # torch: 0 <= beta < 1
_UNIT = _Range(0.0, 1.0)

#: ranges by parameter name, as torch.optim and ds-kernels/ds-comm check them (or, where they
#: do not check, where the update stays meaningful)
_RANGES: dict[str, _Range] = {
    "lr": _NON_NEGATIVE,
    "eps": _NON_NEGATIVE,
    "weight_decay": _NON_NEGATIVE,
    "momentum": _NON_NEGATIVE,
    "lr_decay": _NON_NEGATIVE,
    "initial_accumulator_value": _NON_NEGATIVE,
    "alpha": _NON_NEGATIVE,
    "rho": _UNIT,
    "max_coeff": _POSITIVE,
    "min_coeff": _POSITIVE,
    "coeff_beta": _UNIT_OPEN,
    "factor_max": _POSITIVE,
    "factor_min": _POSITIVE,
    "factor_threshold": _NON_NEGATIVE,
    "freeze_step": _NON_NEGATIVE,
    "var_freeze_step": _NON_NEGATIVE,
    "var_update_scaler": _Range(1.0),
    "local_step_scaler": _Range(1.0),
    "local_step_clipper": _Range(1.0),
}
#: each element of these sequences
_ELEMENT_RANGES: dict[str, _Range] = {"betas": _UNIT_OPEN}
#: (lower, upper) pairs that must be ordered
_ORDERED = (("min_coeff", "max_coeff"), ("factor_min", "factor_max"))
#: integer parameters (torch's float parameters often default to an int 0, so the default's
#: type does not tell)
_INTS = {"freeze_step", "var_freeze_step", "var_update_scaler", "local_step_scaler",
         "local_step_clipper"}  # fmt: skip
#: parameters whose default is None in torch but which are flags
_FLAGS = {"foreach", "fused", "capturable", "differentiable", "maximize", "amsgrad", "nesterov"}


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_real(key: str, v: Any, want_int: bool) -> None:
    if isinstance(v, bool):
        raise ConfigError(f"{key}: expected a number, got {str(v).lower()} (a boolean)")
    if isinstance(v, str):
        raise ConfigError(
            f"{key}: expected a number, got the string {v!r}; write the number without quotes"
        )
    if not _is_real(v):
        raise ConfigError(f"{key}: expected a number, got {type(v).__name__} {v!r}")
    if not math.isfinite(v):
        raise ConfigError(f"{key}: must be a finite number, got {v}")
    if want_int and not float(v).is_integer():
        raise ConfigError(f"{key}: expected an integer, got {v!r}")


def check_values(cls: type, params: dict[str, Any], type_name: str) -> dict[str, Any]:
    """Check ``params`` (already stripped of DeepSpeed-only keys) against ``cls``'s signature
    and the ranges above; returns them with integral floats of integer parameters as ints."""
    try:
        defaults = {
            n: p.default
            for n, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty
        }
    except (TypeError, ValueError):  # a builtin without a signature: ranges only
        defaults = {}
    out = dict(params)
    for name, value in params.items():
        key = f"optimizer.params.{name}"
        default = defaults.get(name)
        if isinstance(default, bool) or (default is None and name in _FLAGS):
            if not isinstance(value, bool) and not (default is None and value is None):
                raise ConfigError(f"{key}: expected true or false for {type_name}, got {value!r}")
            continue
        if isinstance(default, (tuple, list)) or name in _ELEMENT_RANGES:
            n = len(default) if isinstance(default, (tuple, list)) else None
            if not isinstance(value, (list, tuple)) or (n is not None and len(value) != n):
                want = f"a list of {n} numbers" if n else "a list of numbers"
                example = f" such as {list(default)}" if n else ""
                raise ConfigError(f"{key}: {type_name} takes {want}{example}, got {value!r}")
            for i, v in enumerate(value):
                _check_real(f"{key}[{i}]", v, want_int=False)
                rng = _ELEMENT_RANGES.get(name)
                if rng is not None and not rng.holds(float(v)):
                    raise ConfigError(f"{key}[{i}] must be {rng.text()}, got {v!r}")
            out[name] = tuple(float(v) for v in value)
            continue
        if _is_real(default) or name in _RANGES:
            want_int = name in _INTS
            _check_real(key, value, want_int)
            rng = _RANGES.get(name)
            if rng is not None and not rng.holds(float(value)):
                raise ConfigError(f"{key} must be {rng.text()} for {type_name}, got {value!r}")
            if want_int:
                out[name] = int(value)
        # anything else (a backend name, a process group) is the class's to check
    for low, high in _ORDERED:
        lo = out.get(low, defaults.get(low))
        hi = out.get(high, defaults.get(high))
        if _is_real(lo) and _is_real(hi) and lo > hi:
            raise ConfigError(f"optimizer.params.{low} ({lo}) is larger than "
                              f"optimizer.params.{high} ({hi}); swap them")  # fmt: skip
    return out
