"""Human-readable numbers, spelled exactly as DeepSpeed's flops profiler spells them (scripts
parse its output: "1.2 GMACs", "3.4 M", "12.5 ms")."""

from __future__ import annotations

DEFAULT_PRECISION = 2

_SCALES = (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3))
_UNITS = {"T": 1e12, "G": 1e9, "M": 1e6, "K": 1e3, "m": 1e-3, "u": 1e-6}


def number_to_string(
    num: float, units: str | None = None, precision: int = DEFAULT_PRECISION
) -> str:
    """``num`` scaled to T/G/M/K/(none)/m/u with ``precision`` decimals, then a space."""
    if units is None:
        for scale_units, magnitude in _SCALES:
            if num >= magnitude:
                units = scale_units
                break
        else:
            if num >= 1 or num == 0:
                units, magnitude = "", 1.0
            elif num >= 1e-3:
                units, magnitude = "m", 1e-3
            else:
                units, magnitude = "u", 1e-6
    else:
        magnitude = _UNITS.get(units, 1.0)
    return f"{round(num / magnitude, precision):g} {units}"


def macs_to_string(
    macs: float, units: str | None = None, precision: int = DEFAULT_PRECISION
) -> str:
    return f"{number_to_string(macs, units=units, precision=precision)}MACs"


def flops_to_string(
    flops: float, units: str | None = None, precision: int = DEFAULT_PRECISION
) -> str:
    return f"{number_to_string(flops, units=units, precision=precision)}FLOPS"


def bytes_to_string(b: float, units: str | None = None, precision: int = DEFAULT_PRECISION) -> str:
    return f"{number_to_string(b, units=units, precision=precision)}B"


def params_to_string(
    params_num: float, units: str | None = None, precision: int = DEFAULT_PRECISION
) -> str:
    # parameters count in billions ("B"), which number_to_string calls "G"
    units = units.replace("B", "G") if units else units
    return number_to_string(params_num, units=units, precision=precision).replace("G", "B").strip()


def duration_to_string(
    duration: float, units: str | None = None, precision: int = DEFAULT_PRECISION
) -> str:
    return f"{number_to_string(duration, units=units, precision=precision)}s"
