"""The DeepSpeed-compatible JSON config, composed from the sections each package owns.

``DeepSpeedConfig.load(path_or_dict, world_size)`` accepts DeepSpeed's files unchanged. Sections
owned by other packages are validated by those packages' models (``zero_optimization`` by
``ds_zero.ZeroConfig``, ``aio`` and the offload sections by ``ds_offload``); the rest is here.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from ds_all._config_base import (
    AUTO,
    ConfigError,
    Section,
    check_scalar,
    find_non_finite,
    literals,
    scalar_kinds,
    suggest,
    validate_section,
)
from ds_all._config_file import check_depth, read_config_file
from ds_all._optimizers import resolve_optimizer
from ds_all._profiling_config import AutotuningDict, FlopsProfilerSection
from ds_all._schedulers import resolve_scheduler
from ds_all._tensor_parallel import TensorParallelSection
from ds_all.fault import FaultToleranceSection


class FP16Section(Section):
    path = "fp16"
    auto_is_default = True
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

    @field_validator("fp16_master_weights_and_grads")
    @classmethod
    def _fp32_master(cls, v: bool) -> bool:
        if v:
            raise ConfigError("fp16.fp16_master_weights_and_grads=true is not supported: ds-zero "
                              "keeps fp32 master weights and gradients; remove the key")  # fmt: skip
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
    auto_is_default = True
    enabled: bool = False
    immediate_grad_update: bool = False
    check_grad_overflow: bool = False
    ignored = {"bf16_master_weights_and_grads", "bf16_optimizer_states"}


def _params_without_auto(v: Any, path: str) -> Any:
    # "auto" is dropped here (the default stands in, so that zero.Init and the client's own
    # config pass can load the file) and reported by DeepSpeedConfig.unresolved_auto, which
    # initialize() refuses: DeepSpeed would hand the string "auto" to the optimizer.
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ConfigError(f"{path}: expected a JSON object of parameters, got {v!r}")
    return {k: x for k, x in v.items() if not (isinstance(x, str) and x == AUTO)}


class OptimizerSection(Section):
    path = "optimizer"
    type: str
    params: dict[str, Any] = Field(default_factory=dict)
    legacy_fusion: bool = False

    @field_validator("params", mode="before")
    @classmethod
    def _drop_auto(cls, v: Any) -> Any:
        return _params_without_auto(v, "optimizer.params")

    def check_values(self) -> None:
        """Kinds, ranges and names of the params for this optimizer type (ConfigError)."""
        find_non_finite(self.params, "optimizer.params")
        resolve_optimizer(self.type, self.params)


class SchedulerSection(Section):
    path = "scheduler"
    type: str
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("params", mode="before")
    @classmethod
    def _drop_auto(cls, v: Any) -> Any:
        return _params_without_auto(v, "scheduler.params")

    def check_values(self, partial: bool) -> None:
        """Kinds, ranges and contradictions of the params for this schedule (ConfigError);
        ``partial``: some were "auto" (dropped), so the relations between them wait for the
        client to fill them in."""
        find_non_finite(self.params, "scheduler.params")
        resolve_scheduler(self.type, self.params, partial=partial)


class CommsLoggerSection(Section):
    path = "comms_logger"
    auto_is_default = True
    enabled: bool = False
    verbose: bool = False
    prof_all: bool = True
    debug: bool = False
    prof_ops: list[str] = Field(default_factory=list)


class MonitorSection(Section):
    auto_is_default = True
    enabled: bool = False
    output_path: str = ""
    job_name: str = "DeepSpeedJobName"


class TensorBoardSection(MonitorSection):
    path = "tensorboard"


class CSVMonitorSection(MonitorSection):
    path = "csv_monitor"


class WandbSection(Section):
    path = "wandb"
    auto_is_default = True
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

    @field_validator("use_node_local_storage")
    @classmethod
    def _node_local(cls, v: bool) -> bool:
        if v:
            warnings.warn(
                "checkpoint.use_node_local_storage has no effect in ds_all: each rank writes its "
                "own shards into save_dir, and a load reads every shard it needs from there, so "
                "save_dir must be storage all ranks can read (on one node any local directory is)",
                UserWarning,
                stacklevel=2,
            )
        return v


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
    "memory_breakdown", "dump_state", "zero_force_ds_cpu_optimizer",
    "weight_quantization", "hybrid_engine", "timers", "aml", "comet", "use_data_before_expert_parallel_",
    "torch_autocast", "compile", "seq_parallel_communication_data_type",
    "zero_allow_comm_data_type_fp32", "disable_allgather",
}  # fmt: skip

#: top-level sections of features DeepSpeed 0.19.8 has removed and refuses; neither project
#: implements them, and a leftover block would silently change nothing
_REMOVED_TOP = {
    "nebula": "Nebula checkpointing was removed from DeepSpeed; checkpoints are written by the "
              "engine's save_checkpoint",
    "compression_training": "the DeepSpeed compression library was removed; the model would "
                            "train unquantized",
    "quantize_training": "Mixture-of-Quantization (quantize_training) was removed from DeepSpeed",
    "eigenvalue": "eigenvalue-based Mixture-of-Quantization was removed from DeepSpeed",
    "sparse_gradients": "sparse compression of dense embedding gradients was removed from "
                        "DeepSpeed; an embedding built with sparse=True needs no flag",
    "elasticity": "elastic training was removed from DeepSpeed; set train_batch_size / "
                  "train_micro_batch_size_per_gpu / gradient_accumulation_steps directly",
    "graph_harvesting": "graph harvesting was removed from DeepSpeed",
}  # fmt: skip


class DeepSpeedConfig(Section):
    """The whole config. ``resolve_batch(world_size)`` completes the batch triangle."""

    path = ""
    deprecated = {"bfloat16": "bf16"}
    ignored = _IGNORED_TOP
    removed = _REMOVED_TOP
    # Accelerate writes Infinity to mean "never print"; DeepSpeed takes any number here
    non_finite_ok = frozenset({"steps_per_print"})

    train_batch_size: int | None = None
    train_micro_batch_size_per_gpu: int | None = None
    gradient_accumulation_steps: int | None = None
    #: a step count, a float (DeepSpeed prints when global_steps % steps_per_print == 0), or
    #: Infinity / null: never print (held as math.inf, so the modulo never hits). DeepSpeed
    #: 0.19.8's default is null (its docs still say 10): no progress line unless asked for.
    steps_per_print: int | float | None = math.inf
    wall_clock_breakdown: bool = False
    prescale_gradients: bool = False
    gradient_predivide_factor: float = 1.0
    #: DeepSpeed 0.19.8's default is 1.0 (clip the global gradient norm at 1); 0 disables
    gradient_clipping: float = 1.0
    zero_allow_untested_optimizer: bool = False
    communication_data_type: Literal["fp32", "fp16", "bf16"] | None = None
    seed: int | None = None
    dataloader_drop_last: bool = False
    #: Ulysses sequence parallelism (ds-seq): sp x dp = world; ZeRO spans the sp x dp ranks
    sequence_parallel_size: int = 1
    #: data-parallel replicas of a (dp, sp) layout (DeepSpeed's device mesh); when set,
    #: initialize() checks data_parallel_size x sequence_parallel_size == world size
    data_parallel_size: int | None = None
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
    # ds-profile: the profile printed at profile_step, TFLOP/s and MFU; autotuning trials
    flops_profiler: FlopsProfilerSection = Field(default_factory=FlopsProfilerSection)
    autotuning: AutotuningDict = Field(default_factory=dict)
    # ds-data (checked by ds_all/_data_efficiency.py, applied by the engine)
    curriculum_learning: dict[str, Any] = Field(default_factory=dict)
    progressive_layer_drop: dict[str, Any] = Field(default_factory=dict)
    data_efficiency: dict[str, Any] = Field(default_factory=dict)
    sparse_attention: dict[str, Any] | None = None
    # AutoTP training (ds-tp), checked and applied by ds_all/_tensor_parallel.py
    tensor_parallel: TensorParallelSection = Field(default_factory=TensorParallelSection)

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
    def _spp(cls, v: float | None) -> float:
        if v is None:
            return math.inf
        if math.isnan(v):
            raise ConfigError("steps_per_print: NaN is not a step count; use Infinity (or null) "
                              "to never print, or a number of steps")  # fmt: skip
        if v < 1:
            raise ConfigError(f"steps_per_print must be >= 1 (Infinity: never print), got {v}")
        return int(v) if math.isfinite(v) and float(v).is_integer() else v

    @field_validator("sequence_parallel_size")
    @classmethod
    def _sp(cls, v: int) -> int:
        if v < 1:
            raise ConfigError(
                f"sequence_parallel_size must be >= 1 (1: no sequence parallelism), got {v}"
            )
        return v

    @field_validator("data_parallel_size")
    @classmethod
    def _dp(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ConfigError(f"data_parallel_size must be >= 1 (or absent: world size / "
                              f"sequence_parallel_size), got {v}")  # fmt: skip
        return v

    @field_validator("gradient_clipping")
    @classmethod
    def _clip(cls, v: float) -> float:
        if v < 0:
            raise ConfigError(f"gradient_clipping must be >= 0 (0 disables clipping), got {v}")
        return v

    @field_validator("gradient_predivide_factor")
    @classmethod
    def _predivide(cls, v: float) -> float:
        if v <= 0:
            raise ConfigError(f"gradient_predivide_factor must be > 0, got {v}")
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

    #: dotted keys whose value was "auto" where DeepSpeed has no default for it (see load)
    _auto: tuple[str, ...] = PrivateAttr(default=())

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(
        cls,
        config: str | os.PathLike[str] | dict[str, Any] | DeepSpeedConfig,
        *,
        require_resolved: bool = False,
    ) -> DeepSpeedConfig:
        """Validate a config (a JSON file's path, a dict, or a loaded config).

        "auto" values are accepted here, as DeepSpeed's config parser accepts them (Hugging
        Face builds ``zero.Init`` from a config whose scheduler steps are still "auto"); with
        ``require_resolved`` (``initialize()``), one left where DeepSpeed has no default for
        it is a ConfigError naming the key, see :meth:`require_resolved`.
        """
        if isinstance(config, DeepSpeedConfig):
            if require_resolved:
                config.require_resolved()
            return config
        if isinstance(config, (str, os.PathLike)):
            path = Path(config)
            if not path.is_file():
                raise ConfigError(f"config file {str(path)!r} does not exist; pass --deepspeed_config "
                                  "with the path of a JSON file, or config=dict(...)")  # fmt: skip
            data = read_config_file(path)
        elif isinstance(config, dict):
            check_depth(config, "config")
            data = config
        else:
            raise ConfigError(f"config must be a path or a dict, not {type(config).__name__}")
        cfg = validate_section(cls, data)
        assert isinstance(cfg, DeepSpeedConfig)
        cfg._auto = _unresolved_auto(data)
        if cfg.optimizer is not None:
            cfg.optimizer.check_values()
        if cfg.scheduler is not None:
            cfg.scheduler.check_values(partial=any(k.startswith("scheduler.") for k in cfg._auto))
        cfg._validate_owned_sections()
        if require_resolved:
            cfg.require_resolved()
        return cfg

    @property
    def unresolved_auto(self) -> tuple[str, ...]:
        """Keys given as "auto" that a client (Trainer, Accelerate) normally fills in, and that
        DeepSpeed cannot use as they are: top-level values, optimizer and scheduler params, and
        sections other than DeepSpeed's pydantic ones (fp16, bf16, zero_optimization, monitors,
        comms_logger, where "auto" means the default, here as there)."""
        return self._auto

    def require_resolved(self) -> None:
        """ConfigError when "auto" values remain where DeepSpeed has no default for them."""
        if not self._auto:
            return
        keys = ", ".join(self._auto)
        verb = "is" if len(self._auto) == 1 else "are"
        raise ConfigError(
            f'{keys} {verb} "auto": Hugging Face Trainer and Accelerate replace "auto" with a '
            "value from their own arguments before they call initialize(); without them, write "
            "the value into the config"
        )

    def _validate_owned_sections(self) -> None:
        # Sections owned by other packages: validated by their models, errors keep the key path.
        zero_cfg = self.zero_config()
        del zero_cfg
        if self.aio:
            self.aio_config()
        from ds_all._data_efficiency import check_data_sections

        check_data_sections(self)

    def zero_config(self) -> Any:
        from ds_zero import ZeroConfig

        # "auto" means the section's default, as in DeepSpeed's pydantic zero config.
        data = {k: v for k, v in self.zero_optimization.items() if v != AUTO}
        _check_owned_scalars(ZeroConfig, data, "zero_optimization")
        for key in ("offload_optimizer", "offload_param"):
            if isinstance(data.get(key), dict):
                # offload_optimizer.ratio "auto" is ds_offload's own value (chosen from the
                # free device memory), not DeepSpeed's "use the default"
                data[key] = {
                    k: v
                    for k, v in data[key].items()
                    if v != AUTO or (key, k) == ("offload_optimizer", "ratio")
                }
                _check_offload_scalars(key, data[key])
        return _owned(ZeroConfig, data, "zero_optimization")

    def aio_config(self) -> Any:
        find_non_finite(self.aio, "aio")
        try:
            from ds_offload import AioConfig
        except ImportError:
            return dict(self.aio)
        _check_owned_scalars(AioConfig, self.aio, "aio")
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


def _check_owned_scalars(model: Any, data: dict[str, Any], path: str) -> None:
    """The scalar checks of our own sections (no booleans or strings for numbers, no NaN or
    Infinity), applied to a section another package's pydantic model validates."""
    fields = {}
    for name, field in model.model_fields.items():
        fields[name] = field
        for alias in (field.alias, getattr(field.validation_alias, "choices", None)):
            if isinstance(alias, str):
                fields[alias] = field
            elif isinstance(alias, list):
                fields.update({a: field for a in alias if isinstance(a, str)})
    for key, value in data.items():
        if key in fields:
            check_scalar(f"{path}.{key}", value, scalar_kinds(fields[key].annotation))
        find_non_finite(value, f"{path}.{key}")


def _check_offload_scalars(key: str, data: dict[str, Any]) -> None:
    try:
        from ds_offload import OffloadOptimizerConfig, OffloadParamConfig
    except ImportError:
        return  # ds_offload validates the section itself when it is used
    model = OffloadOptimizerConfig if key == "offload_optimizer" else OffloadParamConfig
    _check_owned_scalars(model, data, f"zero_optimization.{key}")


def _unresolved_auto(data: dict[str, Any]) -> tuple[str, ...]:
    """Dotted keys given as "auto" where DeepSpeed itself has no default for "auto" (see
    DeepSpeedConfig.unresolved_auto)."""
    found: list[str] = []
    fields = DeepSpeedConfig.model_fields
    for key, value in data.items():
        key = DeepSpeedConfig.deprecated.get(key, key)
        field = fields.get(key)
        if field is None:
            continue  # an ignored section (warned) or an error already raised
        if isinstance(value, str) and value == AUTO:
            if AUTO not in literals(field):
                found.append(key)
            continue
        if not isinstance(value, dict) or key in ("zero_optimization", "amp"):
            continue  # zero_optimization: DeepSpeed's pydantic model takes "auto" as the default
        section = next((a for a in _section_types(field.annotation)), None)
        if key == "aio" or section is None or section.auto_is_default:
            continue
        if section in (OptimizerSection, SchedulerSection):
            params = value.get("params") or {}
            if isinstance(params, dict):
                found += [f"{key}.params.{k}" for k, v in params.items() if v == AUTO]
            continue
        for k, v in value.items():
            sub = section.model_fields.get(k)
            if isinstance(v, str) and v == AUTO and (sub is None or AUTO not in literals(sub)):
                found.append(f"{key}.{k}")
    return tuple(found)


def _section_types(annotation: Any) -> list[type[Section]]:
    from typing import get_args

    out = []
    for t in (annotation, *get_args(annotation)):
        if isinstance(t, type) and issubclass(t, Section):
            out.append(t)
    return out


def _owned(model: Any, data: dict[str, Any], path: str) -> Any:
    from pydantic import ValidationError

    try:
        return model.model_validate(data)
    except ValidationError as e:
        parts = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            # a validator's ValueError arrives as "Value error, <its message>"
            msg = err["msg"].removeprefix("Value error, ")
            parts.append(f"{path}.{loc}: {msg}" if loc else f"{path}: {msg}")
        raise ConfigError("; ".join(parts)) from None
    except ValueError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(path) else f"{path}: {msg}") from None


__all__ = ["ConfigError", "DeepSpeedConfig", "suggest"]
