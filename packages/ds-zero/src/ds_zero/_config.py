"""``ZeroConfig``: the ``zero_optimization`` section of a DeepSpeed JSON config (pydantic).

Key names and meanings are DeepSpeed's, so configs are accepted unchanged; an unknown key is an
error naming the nearest valid key; features ds-zero does not implement raise when turned on
instead of being silently ignored. The offload sub-sections are kept as dicts and validated by
ds-offload (composed in ds-all), which owns them.
"""

from __future__ import annotations

import difflib
import sys
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ds_zero._leaf_config import LeafModuleConfig
from ds_zero._loss_scaler import LossScaleOptions
from ds_zero._options import ZeroOptions

# accepted for compatibility; they select DeepSpeed-internal code paths with no counterpart here
_NO_EFFECT = {
    "contiguous_gradients": True,  # gradients are always reduced into contiguous partitions
    "reduce_scatter": True,  # stages 1-3 always reduce-scatter bucket by bucket
    "allgather_partitions": True,
    "load_from_fp32_weights": True,
    "elastic_checkpoint": False,
    "sub_group_size": 1_000_000_000,
    "ignore_unused_parameters": True,
    "legacy_stage1": False,
    "round_robin_gradients": False,
    "memory_efficient_linear": True,
    "pipeline_loading_checkpoint": False,
    "override_module_apply": True,
    "log_trace_cache_warnings": False,
    # DeepSpeed 0.19.8 keys that only tune its own implementation (message sizes, host-side
    # grouping, debugging): the math and the memory bounds here do not depend on them
    "use_multi_rank_bucket_allreduce": True,
    "compute_grad_norm": True,  # the global norm is always computed (one all-reduce)
    "stage3_module_granularity_threshold": 0,  # units are whole blocks already
    "stage3_use_all_reduce_for_fetch_params": False,
    "stage3_allgather_sequential": False,
    "parameter_alignment": False,  # flat buffers always start parameters on 16 elements
    "enable_sanity_checks": False,
    "save_muon_momentum_buffer_in_memory": False,
}
# DeepSpeed features ds-zero does not implement: an error when set to anything but the default
_UNSUPPORTED = {
    "zenflow": None,
}
# Features DeepSpeed 0.19.8 has removed and refuses whatever the value (even its old default):
# key -> why. Refused here the same way, so a config that fails there fails here too.
_REMOVED = {
    "mics_shard_size": "MiCS sharding was removed from DeepSpeed; ZeRO-3 shards over the whole "
    "data-parallel group (zero_hpz_partition_size keeps a secondary copy within smaller groups)",
    "mics_hierarchical_params_gather": "MiCS sharding was removed from DeepSpeed",
    "zeropp_loco_param": "LoCo-Zero++ was removed from DeepSpeed; zero_quantized_gradients "
    "alone is ZeRO++'s quantized gradient reduction without LoCo's error feedback",
}

# ZenFlow (DeepSpeed 0.19.8) steps the topk_ratio most important gradient columns on the GPU every
# step and folds the rest into a CPU update every update_interval steps, overlapped with the
# next steps (overlap_step): a different optimizer, not a placement of Adam. Its pieces that
# keep Adam's math map onto offload_optimizer's modes, which the message names.
_ZENFLOW_REFUSED = (
    "zero_optimization.zenflow is not supported by ds-zero (ZenFlow's top-k column selection "
    "and interval updates are not implemented); remove the zenflow section and use "
    'zero_optimization.offload_optimizer: {"device": "cpu"} (the CPU update overlaps the next '
    'forward, same math as Adam), add "delayed_update": true for ZenFlow\'s overlap_step '
    '(each update runs during the next forward/backward, one step stale), or "ratio": 0.5 to '
    "step part of the model on the GPU"
)


class ZeroConfig(BaseModel):
    """DeepSpeed's ``zero_optimization`` section."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid", frozen=True)

    stage: int = Field(0, ge=0, le=3)
    overlap_comm: bool = True
    reduce_bucket_size: int = Field(50_000_000, ge=1)
    allgather_bucket_size: int = Field(50_000_000, ge=1)
    stage3_prefetch_bucket_size: int = Field(50_000_000, ge=0)
    stage3_param_persistence_threshold: int = Field(100_000, ge=0)
    stage3_max_live_parameters: int = Field(1_000_000_000, ge=0)
    stage3_max_reuse_distance: int = Field(1_000_000_000, ge=0)
    stage3_model_persistence_threshold: int = Field(sys.maxsize, ge=0)
    stage3_gather_16bit_weights_on_model_save: bool = False
    offload_optimizer: dict[str, Any] | None = None
    offload_param: dict[str, Any] | None = None
    # ZeRO++ (stage 3): quantized weight gathers, quantized gradient reduction, hpZ
    zero_quantized_weights: bool = False
    zero_quantized_nontrainable_weights: bool = False
    zero_quantized_gradients: bool = False
    zero_hpz_partition_size: int = Field(1, ge=0)
    # the modules stage 3 gathers whole (the engine holding the model flags them; _leaf_config)
    leaf_module: LeafModuleConfig = Field(default_factory=LeafModuleConfig)

    @model_validator(mode="before")
    @classmethod
    def _check_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError(f"zero_optimization must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        renames = {
            "stage3_gather_fp16_weights_on_model_save": "stage3_gather_16bit_weights_on_model_save",
            "prefetch_bucket_size": "stage3_prefetch_bucket_size",
            "param_persistence_threshold": "stage3_param_persistence_threshold",
            "max_live_parameters": "stage3_max_live_parameters",
            "max_reuse_distance": "stage3_max_reuse_distance",
            # DeepSpeed's pydantic field names, accepted beside their stage3_ aliases
            "gather_16bit_weights_on_model_save": "stage3_gather_16bit_weights_on_model_save",
            "model_persistence_threshold": "stage3_model_persistence_threshold",
            "module_granularity_threshold": "stage3_module_granularity_threshold",
            "use_all_reduce_for_fetch_params": "stage3_use_all_reduce_for_fetch_params",
            "allgather_sequential": "stage3_allgather_sequential",
        }
        for old, new in renames.items():
            if old in data:
                data.setdefault(new, data.pop(old))
        deprecated = {
            "cpu_offload": '"offload_optimizer": {"device": "cpu"}',
            "cpu_offload_param": '"offload_param": {"device": "cpu"}',
            "cpu_offload_use_pin_memory": '"pin_memory": true inside offload_param / '
            "offload_optimizer",
        }
        for key, use in deprecated.items():
            if data.get(key):
                raise ValueError(
                    f"zero_optimization.{key} is DeepSpeed's deprecated spelling; use {use}"
                )
            data.pop(key, None)
        # (deprecated spellings are handled above, but still worth suggesting)
        for key, why in _REMOVED.items():
            if key in data:
                raise ValueError(
                    f"zero_optimization.{key}: {why} (DeepSpeed 0.19.8 refuses it too); remove "
                    "the key"
                )
        if data.get("zero_quantized_gradients") and data.get("reduce_scatter") is False:
            # qgZ is a quantized reduce-scatter (DeepSpeed asserts reduce_scatter for it)
            raise ValueError(
                "zero_optimization.zero_quantized_gradients needs zero_optimization."
                'reduce_scatter: set "reduce_scatter": true (or remove it) or turn '
                "zero_quantized_gradients off"
            )
        valid = set(cls.model_fields) | set(_NO_EFFECT) | set(_UNSUPPORTED)
        valid |= set(deprecated)
        for key in data:
            if key not in valid:
                near = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.5)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise ValueError(f"zero_optimization: unknown key {key!r}{hint}")
        if data.get("zenflow") is not None:
            raise ValueError(_ZENFLOW_REFUSED)
        for key, default in _UNSUPPORTED.items():
            if key in data and data[key] != default:
                raise ValueError(
                    f"zero_optimization.{key}={data[key]!r} is not supported by ds-zero; remove "
                    f"the key or set it to {default!r}"
                )
        for key in list(data):
            if key in _NO_EFFECT or key in _UNSUPPORTED:
                data.pop(key)
        return data

    @model_validator(mode="after")
    def _zeropp_needs_stage_3(self) -> ZeroConfig:
        on = [
            key
            for key, value in (
                ("zero_quantized_weights", self.zero_quantized_weights),
                ("zero_quantized_nontrainable_weights", self.zero_quantized_nontrainable_weights),
                ("zero_quantized_gradients", self.zero_quantized_gradients),
                ("zero_hpz_partition_size", self.zero_hpz_partition_size > 1),
            )
            if value
        ]
        if on and self.stage != 3:
            # DeepSpeed accepts and ignores them below stage 3; a key that does nothing is refused
            raise ValueError(
                f"zero_optimization.{', zero_optimization.'.join(on)} (ZeRO++) need stage 3, got "
                f'stage {self.stage}: set "stage": 3 or remove them'
            )
        return self

    def to_options(
        self,
        *,
        param_dtype: torch.dtype | None = None,
        reduce_dtype: torch.dtype = torch.float32,
        gradient_accumulation_steps: int = 1,
        gradient_clipping: float = 0.0,
        loss_scaling: LossScaleOptions | None = None,
    ) -> ZeroOptions:
        """The runtime options; the arguments come from other config sections (``bf16``/``fp16``,
        ``gradient_accumulation_steps``, ``gradient_clipping``) that ds-all owns."""
        return ZeroOptions(
            stage=self.stage,
            param_dtype=param_dtype,
            reduce_dtype=reduce_dtype,
            reduce_bucket_size=self.reduce_bucket_size,
            overlap_comm=self.overlap_comm,
            param_persistence_threshold=self.stage3_param_persistence_threshold,
            prefetch_bucket_size=self.stage3_prefetch_bucket_size,
            max_live_parameters=self.stage3_max_live_parameters,
            max_reuse_distance=self.stage3_max_reuse_distance,
            model_persistence_threshold=self.stage3_model_persistence_threshold,
            gradient_accumulation_steps=gradient_accumulation_steps,
            gradient_clipping=gradient_clipping,
            loss_scaling=loss_scaling,
            quantized_weights=self.zero_quantized_weights,
            quantized_nontrainable_weights=self.zero_quantized_nontrainable_weights,
            quantized_gradients=self.zero_quantized_gradients,
            hpz_partition_size=self.zero_hpz_partition_size,
        )
