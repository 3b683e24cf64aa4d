"""DeepSpeed's ``deepspeed.autotuning.config``: the ``autotuning`` section as attributes.

Parsed by ds-profile's ``AutotuneSettings`` (one definition of the keys, DeepSpeed 0.19.8's
defaults): an unknown key or a bad value raises ``AutotuneConfigError`` naming it, where
DeepSpeed would keep it unread."""

from __future__ import annotations

from typing import Any

from ds_profile.autotune import AutotuneSettings

__all__ = ["DeepSpeedAutotuningConfig", "get_default_model_info_config", "get_model_info_config"]

#: DeepSpeed's ``MODEL_INFO_KEY_DEFAULT_DICT``
_MODEL_INFO_DEFAULTS: dict[str, Any] = {
    "profile": False,
    "num_params": None,
    "hidden_size": None,
    "num_layers": None,
}


def get_default_model_info_config() -> dict[str, Any]:
    return dict(_MODEL_INFO_DEFAULTS)


def get_model_info_config(param_dict: dict[str, Any]) -> dict[str, Any] | None:
    """The ``model_info`` subsection with DeepSpeed's defaults filled in, or None when absent
    (``param_dict`` is the ``autotuning`` section, as in DeepSpeed)."""
    info = param_dict.get("model_info")
    if info is None:
        return None
    return {key: info.get(key, default) for key, default in _MODEL_INFO_DEFAULTS.items()}


class DeepSpeedAutotuningConfig:
    """``DeepSpeedAutotuningConfig(param_dict)``: ``param_dict`` is the whole DeepSpeed config;
    its ``autotuning`` section (absent: every default) becomes DeepSpeed's attributes
    (``enabled``, ``fast``, ``results_dir``, ..., ``num_tuning_micro_batch_sizes``), and
    ``settings`` holds the parsed section with ds-profile's own keys too."""

    settings: AutotuneSettings
    enabled: bool
    fast: bool
    results_dir: str
    exps_dir: str
    overwrite: bool
    start_profile_step: int
    end_profile_step: int
    metric: str
    metric_path: str | None
    tuner_type: str
    tuner_early_stopping: int
    tuner_num_trials: int
    arg_mappings: dict[str, str] | None
    model_info: dict[str, Any] | None
    model_info_path: str | None
    mp_size: int
    max_train_batch_size: int | None
    min_train_batch_size: int
    max_train_micro_batch_size_per_gpu: int
    min_train_micro_batch_size_per_gpu: int
    num_tuning_micro_batch_sizes: int

    def __init__(self, param_dict: dict[str, Any] | None) -> None:
        raw = dict((param_dict or {}).get("autotuning") or {})
        self.settings = AutotuneSettings.from_config(raw)
        s = self.settings
        self.enabled, self.fast = s.enabled, s.fast
        self.results_dir, self.exps_dir, self.overwrite = s.results_dir, s.exps_dir, s.overwrite
        self.start_profile_step, self.end_profile_step = s.start_profile_step, s.end_profile_step
        self.metric, self.metric_path = s.metric, s.metric_path
        self.tuner_type = s.tuner_type
        self.tuner_early_stopping, self.tuner_num_trials = (
            s.tuner_early_stopping,
            s.tuner_num_trials,
        )
        self.arg_mappings = dict(s.arg_mappings) if s.arg_mappings is not None else None
        self.model_info = get_model_info_config(raw)
        self.model_info_path = s.model_info_path
        self.mp_size = s.mp_size
        self.max_train_batch_size, self.min_train_batch_size = (
            s.max_train_batch_size,
            s.min_train_batch_size,
        )
        self.max_train_micro_batch_size_per_gpu = s.max_train_micro_batch_size_per_gpu
        self.min_train_micro_batch_size_per_gpu = s.min_train_micro_batch_size_per_gpu
        self.num_tuning_micro_batch_sizes = s.num_tuning_micro_batch_sizes

    def repr(self) -> dict[str, Any]:
        """DeepSpeed's ``DeepSpeedConfigObject.repr``: the attributes as a dict."""
        return {k: v for k, v in self.__dict__.items() if k != "settings"}

    def __repr__(self) -> str:
        return f"DeepSpeedAutotuningConfig({self.repr()!r})"
