"""The ``autotuning`` config section: DeepSpeed 0.19.8's keys and defaults, plus the search-space
keys of this tuner. One parser for the tuner and for the training job it launches (ds-all
validates a job's section with it)."""

from __future__ import annotations

import difflib
import math
import warnings
from dataclasses import dataclass, field, fields
from typing import Any

OFFLOADS = ("none", "optimizer", "optimizer+param")
METRICS = ("latency", "throughput", "flops")
TUNERS = ("gridsearch", "random", "model_based")


class AutotuneConfigError(ValueError):
    """A bad ``autotuning`` key; the message names it and says what is accepted."""


#: keys shown in DeepSpeed's AUTOTUNING_FORMAT that its autotuner never reads: accepted (as
#: DeepSpeed does) with a warning naming the keys that set the profiled steps
_IGNORED_KEYS = {"start_step": "start_profile_step", "end_step": "end_profile_step"}

#: DeepSpeed keys this tuner accepts but does not use
_UNUSED_KEYS = {
    "min_train_batch_size": "the global batch is the config's train_batch_size (or "
    "max_train_batch_size); micro-batch sizes come from the min/max_train_micro_batch_size_per_gpu "
    "keys or micro_batch_sizes",
    "num_tuning_micro_batch_sizes": "every micro-batch size within the min/max keys (or "
    "micro_batch_sizes) is a candidate",
}
_UNUSED_MODEL_INFO = ("num_params", "hidden_size", "num_layers")


def _warn(message: str) -> None:
    # reported at this line, so the same text is shown once per process (Python's default
    # filter) however often the section is parsed (the engine and its accessors parse it again)
    warnings.warn(message, UserWarning, stacklevel=2)


@dataclass(frozen=True)
class ModelInfo:
    profile: bool = False
    num_params: int | None = None
    hidden_size: int | None = None
    num_layers: int | None = None


@dataclass(frozen=True)
class AutotuneSettings:
    """DeepSpeed's keys, then ours (``memory_per_device_gb``, ``zero_stages``, ``offload``,
    ``activation_checkpointing_arg``, ``trial_timeout_s``, ``session_timeout_s``)."""

    enabled: bool = False
    fast: bool = True
    results_dir: str = "autotuning_results"
    exps_dir: str = "autotuning_exps"
    overwrite: bool = True
    start_profile_step: int = 3
    end_profile_step: int = 5
    metric_path: str | None = None
    metric: str = "throughput"
    tuner_type: str = "gridsearch"
    tuner_early_stopping: int = 5
    tuner_num_trials: int = 50
    arg_mappings: dict[str, str] | None = None
    model_info: ModelInfo = field(default_factory=ModelInfo)
    model_info_path: str | None = None
    mp_size: int = 1
    max_train_batch_size: int | None = None
    min_train_batch_size: int = 1
    max_train_micro_batch_size_per_gpu: int = 1024
    min_train_micro_batch_size_per_gpu: int = 1
    num_tuning_micro_batch_sizes: int = 3
    # ours: the device memory budget for the estimator (default: the device's own), the search
    # space, the user-script flag that turns activation checkpointing on, a per-trial time limit
    memory_per_device_gb: float | None = None
    zero_stages: tuple[int, ...] = (0, 1, 2, 3)
    offload: tuple[str, ...] = OFFLOADS
    activation_checkpointing_arg: str | None = None
    micro_batch_sizes: tuple[int, ...] | None = None
    trial_timeout_s: float = 1800.0
    # the whole session's time limit (profile run included): no trial starts after it and a
    # running one is stopped at it, so a caller with a deadline still gets the report of what
    # finished; None: no limit
    session_timeout_s: float | None = None
    seed: int = 0

    @classmethod
    def from_config(cls, raw: dict[str, Any] | None) -> AutotuneSettings:
        """Parse and check a section; unknown keys and bad values raise AutotuneConfigError."""
        raw = dict(raw or {})
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in raw.items():
            if key in _IGNORED_KEYS:
                _warn(
                    f"autotuning.{key} has no effect (DeepSpeed 0.19.8 shows it in its "
                    f"AUTOTUNING_FORMAT but never reads it): the profiled steps are set by "
                    f"autotuning.{_IGNORED_KEYS[key]}"
                )
                continue
            if key in _UNUSED_KEYS:
                _warn(f"autotuning.{key} has no effect in this tuner: {_UNUSED_KEYS[key]}")
            if key == "model_info" and isinstance(value, dict):
                for sub in _UNUSED_MODEL_INFO:
                    if value.get(sub) is not None:
                        _warn(
                            f"autotuning.model_info.{sub} has no effect in this tuner: the "
                            "model facts are measured by a profile run (model_info.profile)"
                        )
            if key not in known:
                near = difflib.get_close_matches(key, list(known), n=1)
                hint = (
                    f"did you mean {near[0]!r}?"
                    if near
                    else f"valid keys: {', '.join(sorted(known))}"
                )
                raise AutotuneConfigError(f"autotuning.{key}: unknown key; {hint}")
            kwargs[key] = _convert(key, value, cls.__dataclass_fields__[key].default)
        settings = cls(**kwargs)
        settings._check()
        return settings

    def _check(self) -> None:
        def bad(key: str, want: str) -> AutotuneConfigError:
            return AutotuneConfigError(
                f"autotuning.{key}: expected {want}, got {getattr(self, key)!r}"
            )

        for key in ("start_profile_step", "end_profile_step", "tuner_early_stopping", "tuner_num_trials",
                    "mp_size", "min_train_batch_size", "max_train_micro_batch_size_per_gpu",
                    "min_train_micro_batch_size_per_gpu", "num_tuning_micro_batch_sizes"):  # fmt: skip
            if getattr(self, key) < 1:
                raise bad(key, "a whole number of at least 1")
        if self.end_profile_step <= self.start_profile_step:
            raise AutotuneConfigError(
                f"autotuning.end_profile_step ({self.end_profile_step}) must be after "
                f"start_profile_step ({self.start_profile_step}): the latency is measured "
                f"between the two; set autotuning.end_profile_step above "
                f"{self.start_profile_step} (or lower autotuning.start_profile_step)"
            )
        if self.metric not in METRICS:
            raise bad("metric", " or ".join(METRICS))
        if self.tuner_type not in TUNERS:
            raise bad("tuner_type", " or ".join(TUNERS))
        if not self.results_dir:
            raise bad("results_dir", "a directory")
        if not self.exps_dir:
            raise bad("exps_dir", "a directory")
        if self.mp_size != 1:
            raise AutotuneConfigError(
                f"autotuning.mp_size: only 1 is supported, got {self.mp_size} (this tuner "
                "searches data-parallel ZeRO configs, not model parallelism); set "
                "autotuning.mp_size to 1 or remove the key"
            )
        if not self.zero_stages or any(s not in (0, 1, 2, 3) for s in self.zero_stages):
            raise bad("zero_stages", "a list of ZeRO stages 0-3")
        if not self.offload or any(o not in OFFLOADS for o in self.offload):
            raise bad("offload", f"a list of {', '.join(OFFLOADS)}")
        if self.memory_per_device_gb is not None and not (
            math.isfinite(self.memory_per_device_gb) and self.memory_per_device_gb > 0
        ):
            raise bad("memory_per_device_gb", "GiB per device above 0")
        if self.micro_batch_sizes is not None and (
            not self.micro_batch_sizes or any(m < 1 for m in self.micro_batch_sizes)
        ):
            raise bad("micro_batch_sizes", "a list of micro-batch sizes of at least 1")
        if self.max_train_micro_batch_size_per_gpu < self.min_train_micro_batch_size_per_gpu:
            raise bad(
                "max_train_micro_batch_size_per_gpu", "at least min_train_micro_batch_size_per_gpu"
            )
        if not self.trial_timeout_s > 0:
            raise bad("trial_timeout_s", "seconds above 0")
        if self.session_timeout_s is not None and not (
            math.isfinite(self.session_timeout_s) and self.session_timeout_s > 0
        ):
            raise bad("session_timeout_s", "seconds above 0 (or null for no limit)")


def _convert(key: str, value: Any, default: Any) -> Any:
    if key == "model_info":
        if value is None:  # DeepSpeed: null is the default (no model info)
            return ModelInfo()
        if not isinstance(value, dict):
            raise AutotuneConfigError(f"autotuning.model_info: expected an object, got {value!r}")
        names = {f.name for f in fields(ModelInfo)}
        unknown = set(value) - names
        if unknown:
            raise AutotuneConfigError(
                f"autotuning.model_info.{sorted(unknown)[0]}: unknown key; valid keys: {', '.join(sorted(names))}"
            )
        return ModelInfo(**value)
    if key in ("zero_stages", "offload", "micro_batch_sizes"):
        if not isinstance(value, list):
            raise AutotuneConfigError(f"autotuning.{key}: expected a list, got {value!r}")
        return tuple(value)
    if key == "arg_mappings":
        if value is not None and not (
            isinstance(value, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
        ):
            raise AutotuneConfigError(
                "autotuning.arg_mappings: expected an object mapping config keys to script flags, "
                'e.g. {"train_micro_batch_size_per_gpu": "--per_device_train_batch_size"}'
            )
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise AutotuneConfigError(f"autotuning.{key}: expected true or false, got {value!r}")
        return value
    if isinstance(default, int) or key in ("max_train_batch_size",):
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            and not (isinstance(value, float) and value.is_integer())
        ):
            if value is None and default is None:
                return None
            raise AutotuneConfigError(f"autotuning.{key}: expected a whole number, got {value!r}")
        return int(value)
    if isinstance(default, float) or key in ("memory_per_device_gb", "session_timeout_s"):
        if value is None and default is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise AutotuneConfigError(f"autotuning.{key}: expected a number, got {value!r}")
        return float(value)
    if value is not None and not isinstance(value, str):
        raise AutotuneConfigError(f"autotuning.{key}: expected a string, got {value!r}")
    return value
