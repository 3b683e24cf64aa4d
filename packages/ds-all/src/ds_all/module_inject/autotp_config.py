"""``deepspeed.module_inject.autotp_config``: AutoTP partition specs and presets (ds-tp)."""

from __future__ import annotations

from ds_tp import AutoTPConfig, PartitionType, TPLayerSpec, merge_autotp_configs, preset_config


class AutoTPPresets:
    """DeepSpeed's preset lookup: ``AutoTPPresets.get_preset("llama")`` (None when unknown)."""

    @staticmethod
    def get_preset(model_type: str) -> AutoTPConfig | None:
        try:
            return preset_config(model_type)
        except ValueError:
            return None


__all__ = ["AutoTPConfig", "AutoTPPresets", "PartitionType", "TPLayerSpec", "merge_autotp_configs"]
