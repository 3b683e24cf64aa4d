"""The ``flops_profiler`` and ``autotuning`` config sections (DeepSpeed 0.19.8's keys and
defaults), read by the engine's profiling glue (``_profiling.py``) and by the autotuner
(``ds_profile.autotune``, which writes the ``autotuning`` section of each trial's config)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, field_validator

from ds_all._config_base import ConfigError, Section
from ds_profile.autotune import AutotuneSettings


class FlopsProfilerSection(Section):
    path = "flops_profiler"
    enabled: bool = False
    #: share of the forward recomputed in backward (activation checkpointing), 0 to 1
    recompute_fwd_factor: float = 0.0
    profile_step: int = 1
    module_depth: int = -1
    top_modules: int = 1
    detailed: bool = True
    output_file: str | None = None
    #: ds-all extension: peak FLOP/s per device in TFLOP/s for the MFU of the throughput line
    #: (default: ds_accel.peak_flops's table for the device and dtype, or DS_PEAK_FLOPS)
    peak_tflops: float | None = None

    @field_validator("recompute_fwd_factor")
    @classmethod
    def _factor(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"flops_profiler.recompute_fwd_factor must be in [0, 1], got {v}")
        return v

    @field_validator("profile_step", "top_modules")
    @classmethod
    def _non_negative(cls, v: int, info: Any) -> int:
        # DeepSpeed accepts 0 for both: profile_step 0 profiles the first training step
        # (global_steps is 0 until the first optimizer step), top_modules 0 lists no module
        if v < 0:
            raise ConfigError(f"flops_profiler.{info.field_name} must be at least 0, got {v}")
        return v

    @field_validator("module_depth")
    @classmethod
    def _depth(cls, v: int) -> int:
        if v < -1:
            raise ConfigError(
                f"flops_profiler.module_depth must be -1 (all) or a depth >= 0, got {v}"
            )
        return v

    @field_validator("peak_tflops")
    @classmethod
    def _peak(cls, v: float | None) -> float | None:
        if v is not None and v <= 0:
            raise ConfigError(
                f"flops_profiler.peak_tflops must be above 0 (TFLOP/s per device), got {v}"
            )
        return v


def _validate_autotuning(raw: dict[str, Any]) -> dict[str, Any]:
    """The ``autotuning`` section is parsed by ds-profile's autotuner (one definition of its
    keys and defaults for the tuner and for the training job it launches)."""
    try:
        AutotuneSettings.from_config(raw)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return raw


#: the ``autotuning`` section: kept as the user's dict, validated by ds-profile's parser
AutotuningDict = Annotated[dict[str, Any], AfterValidator(_validate_autotuning)]


def autotuning_settings(raw: dict[str, Any]) -> AutotuneSettings:
    return AutotuneSettings.from_config(raw)
