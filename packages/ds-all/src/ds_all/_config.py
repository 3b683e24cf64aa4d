"""The DeepSpeed-compatible JSON config, composed from the sections each package owns.

``DeepSpeedConfig.load(path_or_dict, world_size)`` accepts DeepSpeed's files unchanged. Sections
owned by other packages are validated by those packages' models (``zero_optimization`` by
``ds_zero.ZeroConfig``, ``aio`` and the offload sections by ``ds_offload``); the rest is here.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ds_all._config_base import ConfigError, Section, suggest, validate_section
from ds_all.fault import FaultToleranceSection


class FP16Section(Section):
    path = "fp16"
    enabled: bool = False
    auto_cast: bool = False
    loss_scale: float = 0.0  # 0 = dynamic loss scaling
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    consecutive_hysteresis: bool = False
    min_loss_scale: float = 1.0
    fp16_master_weights_and_grads: bool = False
    ignored = {"type"}

    @field_validator("initial_scale_power")
    @classmethod
    def _power(cls, v: int) -> int:
        if not 0 <= v <= 64:
            raise ConfigError(f"fp16.initial_scale_power must be in 0..64, got {v}")
        return v

    @field_validator("loss_scale_window", "hysteresis")
    @classmethod
    def _positive(cls, v: int, info: Any) -> int:
        if v < 1:
            raise ConfigError(f"fp16.{info.field_name} must be >= 1, got {v}")
        return v

    @field_validator("loss_scale")
    @classmethod
    def _non_negative(cls, v: float) -> float:
        if v < 0:
            raise ConfigError(f"fp16.loss_scale must be >= 0 (0 = dynamic loss scaling), got {v}")
        return v

    @field_validator("min_loss_scale")
    @classmethod
    def _positive_floor(cls, v: float) -> float:
        # ds-zero's dynamic scaler halves down to this floor; 0 would let the scale reach 0.
        if v <= 0:
            raise ConfigError(f"fp16.min_loss_scale must be > 0, got {v}")
        return v


class BF16Section(Section):
    path = "bf16"
    enabled: bool = False
    immediate_grad_update: bool = False
    check_grad_overflow: bool = False
    ignored = {"bf16_master_weights_and_grads", "bf16_optimizer_states"}


class OptimizerSection(Section):
    path = "optimizer"
    type: str
    params: dict[str, Any] = Field(default_factory=dict)
    legacy_fusion: bool = False

    @field_validator("params", mode="before")
    @classmethod
    def _drop_auto(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: x for k, x in v.items() if x != "auto"}
        return v


class SchedulerSection(Section):
    path = "scheduler"
    type: str
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("params", mode="before")
    @classmethod
    def _drop_auto(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: x for k, x in v.items() if x != "auto"}
        return v


class CommsLoggerSection(Section):
    path = "comms_logger"
    enabled: bool = False
    verbose: bool = False
    prof_all: bool = True
    debug: bool = False
    prof_ops: list[str] = Field(default_factory=list)


class MonitorSection(Section):
    enabled: bool = False
    output_path: str = ""
    job_name: str = "DeepSpeedJobName"


class TensorBoardSection(MonitorSection):
    path = "tensorboard"


class CSVMonitorSection(MonitorSection):
    path = "csv_monitor"


class WandbSection(Section):
    path = "wandb"
    enabled: bool = False
    group: str | None = None
    team: str | None = None
    project: str = "deepspeed"


class CheckpointSection(Section):
    path = "checkpoint"
    tag_validation: Literal[
        "Ignore", "Warn", "Fail", "ignore", "warn", "fail", "IGNORE", "WARN", "FAIL"
    ] = "Warn"
    load_universal: bool = False
    use_node_local_storage: bool = False
    parallel_write: dict[str, Any] = Field(default_factory=dict)
    # ours: resume from the newest complete checkpoint of `save_dir` on start (launcher restarts)
    auto_resume: bool = False
    save_dir: str | None = None
    # ours: on SIGTERM, save to save_dir and exit 0 (preemption)
    save_on_signal: bool = False
    async_save: bool = False
    verify_hashes: bool = False


class PipelineSection(Section):
    path = "pipeline"
    stages: int | Literal["auto"] = "auto"
    partition: str = "best"
    seed_layers: bool = False
    activation_checkpoint_interval: int = 0
    pipe_partitioned: bool = True
    grad_partitioned: bool = True
    schedule: Literal["1f1b", "gpipe", "interleaved"] = "1f1b"
    virtual_stages: int = 1


class ActivationCheckpointingSection(Section):
    path = "activation_checkpointing"
    partition_activations: bool = False
    cpu_checkpointing: bool = False
    contiguous_memory_optimization: bool = False
    number_checkpoints: int | None = None
    synchronize_checkpoint_boundary: bool = False
    profile: bool = False


class DataTypesSection(Section):
    path = "data_types"
    grad_accum_dtype: Literal["fp32", "fp16", "bf16"] | None = None


#: DeepSpeed sections this project accepts and ignores, with a warning (not errors: scripts
#: written for DeepSpeed carry them routinely).
_IGNORED_TOP = {
    "flops_profiler", "autotuning", "elasticity", "compression_training", "data_efficiency",
    "sparse_attention", "memory_breakdown", "dump_state", "zero_force_ds_cpu_optimizer",
    "curriculum_learning", "eigenvalue", "progressive_layer_drop", "nebula", "quantize_training",
    "weight_quantization", "hybrid_engine", "timers", "aml", "comet", "use_data_before_expert_parallel_",
    "graph_harvesting", "torch_autocast", "compile", "sequence_parallel_size", "seq_parallel_communication_data_type",
    "zero_allow_comm_data_type_fp32", "disable_allgather", "sparse_gradients",
}  # fmt: skip


class DeepSpeedConfig(Section):
    """The whole config. ``resolve_batch(world_size)`` completes the batch triangle."""

    path = ""
    deprecated = {"bfloat16": "bf16"}
    ignored = _IGNORED_TOP

    train_batch_size: int | None = None
    train_micro_batch_size_per_gpu: int | None = None
    gradient_accumulation_steps: int | None = None
    steps_per_print: int = 10
    wall_clock_breakdown: bool = False
    prescale_gradients: bool = False
    gradient_predivide_factor: float = 1.0
    gradient_clipping: float = 0.0
    zero_allow_untested_optimizer: bool = False
    communication_data_type: Literal["fp32", "fp16", "bf16"] | None = None
    seed: int | None = None
    dataloader_drop_last: bool = False
    optimizer: OptimizerSection | None = None
    scheduler: SchedulerSection | None = None
    fp16: FP16Section = Field(default_factory=FP16Section)
    bf16: BF16Section = Field(default_factory=BF16Section)
    zero_optimization: dict[str, Any] = Field(default_factory=dict)
    aio: dict[str, Any] = Field(default_factory=dict)
    comms_logger: CommsLoggerSection = Field(default_factory=CommsLoggerSection)
    tensorboard: TensorBoardSection = Field(default_factory=TensorBoardSection)
    csv_monitor: CSVMonitorSection = Field(default_factory=CSVMonitorSection)
    wandb: WandbSection = Field(default_factory=WandbSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    # ours: collective timeout, stall watchdog, control-flow check; ds_all/fault/_config.py
    fault_tolerance: FaultToleranceSection = Field(default_factory=FaultToleranceSection)
    pipeline: PipelineSection = Field(default_factory=PipelineSection)
    activation_checkpointing: ActivationCheckpointingSection = Field(
        default_factory=ActivationCheckpointingSection
    )
    data_types: DataTypesSection = Field(default_factory=DataTypesSection)
    amp: dict[str, Any] = Field(default_factory=dict)

    @field_validator(
        "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"
    )
    @classmethod
    def _positive_batch(cls, v: int | None, info: Any) -> int | None:
        if v is not None and v < 1:
            raise ConfigError(f"{info.field_name} must be a positive integer, got {v}")
        return v

    @field_validator("steps_per_print")
    @classmethod
    def _spp(cls, v: int) -> int:
        if v < 1:
            raise ConfigError(f"steps_per_print must be >= 1, got {v}")
        return v

    @field_validator("gradient_clipping")
    @classmethod
    def _clip(cls, v: float) -> float:
        if v < 0:
            raise ConfigError(f"gradient_clipping must be >= 0 (0 disables clipping), got {v}")
        return v

    @field_validator("zero_optimization", mode="before")
    @classmethod
    def _zero(cls, v: Any) -> Any:
        if v is None:
            return {}
        if isinstance(v, bool):
            # DeepSpeed's oldest form: `"zero_optimization": true` means stage 1 (false: 0).
            warnings.warn(
                f'config key "zero_optimization": {str(v).lower()} is deprecated; use '
                f'"zero_optimization": {{"stage": {int(v)}}}',
                DeprecationWarning,
                stacklevel=2,
            )
            return {"stage": int(v)}
        if not isinstance(v, dict):
            raise ConfigError(f"zero_optimization: expected a JSON object, got {v!r}")
        return _zero_deprecated(v)

    @field_validator("amp")
    @classmethod
    def _amp(cls, v: dict[str, Any]) -> dict[str, Any]:
        if v.get("enabled"):
            raise ConfigError("amp: NVIDIA apex AMP is not supported; use \"bf16\": {\"enabled\": true} "
                              "or \"fp16\": {\"enabled\": true}")  # fmt: skip
        return v

    @model_validator(mode="after")
    def _consistent(self) -> DeepSpeedConfig:
        if self.fp16.enabled and self.bf16.enabled:
            raise ConfigError("fp16.enabled and bf16.enabled are both true; enable at most one")
        return self

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(
        cls, config: str | os.PathLike[str] | dict[str, Any] | DeepSpeedConfig
    ) -> DeepSpeedConfig:
        if isinstance(config, DeepSpeedConfig):
            return config
        if isinstance(config, (str, os.PathLike)):
            path = Path(config)
            if not path.is_file():
                raise ConfigError(f"config file {str(path)!r} does not exist; pass --deepspeed_config "
                                  "with the path of a JSON file, or config=dict(...)")  # fmt: skip
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"config file {str(path)!r} is not valid JSON: line {e.lineno} "
                                  f"column {e.colno}: {e.msg}") from None  # fmt: skip
        elif isinstance(config, dict):
            data = config
        else:
            raise ConfigError(f"config must be a path or a dict, not {type(config).__name__}")
        cfg = validate_section(cls, data)
        assert isinstance(cfg, DeepSpeedConfig)
        cfg._validate_owned_sections()
        return cfg

    def _validate_owned_sections(self) -> None:
        # Sections owned by other packages: validated by their models, errors keep the key path.
        zero_cfg = self.zero_config()
        del zero_cfg
        if self.aio:
            self.aio_config()

    def zero_config(self) -> Any:
        from ds_zero import ZeroConfig

        # "auto" (Hugging Face) means the section's default, as everywhere else in the config.
        data = {k: v for k, v in self.zero_optimization.items() if v != "auto"}
        return _owned(ZeroConfig, data, "zero_optimization")

    def aio_config(self) -> Any:
        try:
            from ds_offload import AioConfig
        except ImportError:
            return dict(self.aio)
        return _owned(AioConfig, self.aio, "aio")

    # ---------------------------------------------------------------- batch triangle
    def resolve_batch(self, world_size: int) -> tuple[int, int, int]:
        """(train_batch_size, micro_batch_per_gpu, gradient_accumulation_steps), with
        train = micro x accumulation x world_size; any two determine the third."""
        t, m, g = (
            self.train_batch_size,
            self.train_micro_batch_size_per_gpu,
            self.gradient_accumulation_steps,
        )
        w = world_size
        if t is not None and m is not None and g is not None:
            if t != m * g * w:
                raise ConfigError(
                    f"train_batch_size ({t}) must equal train_micro_batch_size_per_gpu ({m}) x "
                    f"gradient_accumulation_steps ({g}) x data-parallel size ({w}) = {m * g * w}; "
                    "fix one of them or leave one out to have it inferred"
                )
        elif t is not None and m is not None:
            if t % (m * w):
                raise ConfigError(f"train_batch_size ({t}) is not divisible by train_micro_batch_size_per_gpu "
                                  f"({m}) x data-parallel size ({w}) = {m * w}, so gradient_accumulation_steps "
                                  "cannot be inferred")  # fmt: skip
            g = t // (m * w)
        elif t is not None and g is not None:
            if t % (g * w):
                raise ConfigError(f"train_batch_size ({t}) is not divisible by gradient_accumulation_steps "
                                  f"({g}) x data-parallel size ({w}) = {g * w}, so "
                                  "train_micro_batch_size_per_gpu cannot be inferred")  # fmt: skip
            m = t // (g * w)
        elif m is not None:
            g = g or 1
            t = m * g * w
        elif t is not None:
            g = 1
            if t % w:
                raise ConfigError(
                    f"train_batch_size ({t}) is not divisible by the data-parallel size ({w})"
                )
            m = t // w
        else:
            raise ConfigError("set train_batch_size or train_micro_batch_size_per_gpu (or both); "
                              "gradient_accumulation_steps defaults to 1")  # fmt: skip
        if m < 1 or g < 1:
            raise ConfigError(
                f"batch sizes resolved to micro={m}, accumulation={g}; both must be >= 1"
            )
        return t, m, g


#: DeepSpeed's deprecated zero_optimization keys: (old) -> (replacement, how the value maps).
#: ds-zero knows only the current names, so they are translated here, with a warning.
_ZERO_OFFLOAD_FLAGS = {"cpu_offload": "offload_optimizer", "cpu_offload_param": "offload_param"}


def _zero_deprecated(section: dict[str, Any]) -> dict[str, Any]:
    out = dict(section)

    def warn(old: str, new: str) -> None:
        warnings.warn(
            f"config key 'zero_optimization.{old}' is deprecated; use {new}",
            DeprecationWarning,
            stacklevel=4,
        )

    for old, new in _ZERO_OFFLOAD_FLAGS.items():
        if old not in out:
            continue
        flag = out.pop(old)
        warn(old, f'"{new}": {{"device": "cpu"}}')
        if not isinstance(flag, bool):
            raise ConfigError(f"zero_optimization.{old} must be true or false, got {flag!r}")
        if flag:
            if out.get(new):
                raise ConfigError(f"zero_optimization.{old} and its replacement "
                                  f"zero_optimization.{new} are both set; keep only {new!r}")  # fmt: skip
            out[new] = {"device": "cpu"}
    if "cpu_offload_use_pin_memory" in out:
        pin = out.pop("cpu_offload_use_pin_memory")
        warn("cpu_offload_use_pin_memory", '"pin_memory" inside offload_optimizer / offload_param')
        for new in _ZERO_OFFLOAD_FLAGS.values():
            if isinstance(out.get(new), dict):
                out[new] = {**out[new], "pin_memory": bool(pin)}
    old = "stage3_gather_fp16_weights_on_model_save"
    if old in out:
        new = "stage3_gather_16bit_weights_on_model_save"
        warn(old, repr(new))
        if new in out:
            raise ConfigError(f"zero_optimization.{old} and its replacement zero_optimization.{new} "
                              f"are both set; keep only {new!r}")  # fmt: skip
        out[new] = out.pop(old)
    return out


def _owned(model: Any, data: dict[str, Any], path: str) -> Any:
    from pydantic import ValidationError

    try:
        return model.model_validate(data)
    except ValidationError as e:
        parts = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            parts.append(f"{path}.{loc}: {err['msg']}" if loc else f"{path}: {err['msg']}")
        raise ConfigError("; ".join(parts)) from None
    except ValueError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(path) else f"{path}: {msg}") from None


__all__ = ["ConfigError", "DeepSpeedConfig", "suggest"]
