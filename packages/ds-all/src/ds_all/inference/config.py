"""``deepspeed.inference.config``: the ``init_inference`` config, with DeepSpeed 0.19.8's keys,
aliases and defaults.

The model accepts every key DeepSpeed's does (unknown keys are refused, naming the key), maps
the deprecated top-level keys to their sections as DeepSpeed does (``mp_size`` ->
``tensor_parallel.tp_size``, ``mpu`` -> ``tensor_parallel.mpu``, ``ep_size`` -> ``moe.ep_size``
...), and converts ``dtype`` spellings to a ``torch.dtype``. What the engine cannot honour is
refused by :meth:`DeepSpeedInferenceConfig.check_supported`, which the engine calls before it
touches the model: a config object stays constructible exactly as DeepSpeed's is.
"""

from __future__ import annotations

import enum
import warnings
from typing import Any

import torch
from pydantic import ConfigDict, Field, field_validator, model_validator

from ds_all._config_base import ConfigError, Section

__all__ = [
    "DeepSpeedInferenceConfig",
    "DeepSpeedMoEConfig",
    "DeepSpeedTPConfig",
    "DtypeEnum",
    "InferenceCheckpointConfig",
    "MoETypeEnum",
]


class DtypeEnum(enum.Enum):
    """The ``dtype`` spellings DeepSpeed's inference config understands, per torch dtype."""

    fp16 = (torch.float16, "torch.float16", "fp16", "float16", "half")
    fp32 = (torch.float32, "torch.float32", "fp32", "float32", "float")
    bf16 = (torch.bfloat16, "torch.bfloat16", "bf16", "bfloat16", "bfloat")
    int8 = (torch.int8, "torch.int8", "int8")

    @classmethod
    def from_str(cls, value: str) -> DtypeEnum:
        for member in cls:
            if value in member.value[1:]:
                return member
        spellings = [s for m in cls for s in m.value[1:]]
        raise ConfigError(f"dtype: {value!r} is not a dtype name; use one of {spellings}")


class MoETypeEnum(str, enum.Enum):
    residual = "residual"
    standard = "standard"


#: the dtypes the engine converts a model to (DeepSpeed's ``.half()``, ``.bfloat16()``, ``.float()``)
CONVERTIBLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class DeepSpeedTPConfig(Section):
    """``tensor_parallel`` (alias ``tp``)."""

    path = "tensor_parallel"
    #: DeepSpeed reads no switch: tp_size alone decides (see check_supported)
    enabled: bool = True
    tp_size: int = 1
    #: DeepSpeed's granularity for uneven splits; every split here is even (sizes that do not
    #: divide tp_size are refused), and the split never changes the outputs
    tp_grain_size: int = 64
    #: a Megatron-style object with ``get_model_parallel_group()``: supplies the group and size
    mpu: Any = None
    tp_group: Any = None

    @field_validator("tp_size", "tp_grain_size")
    @classmethod
    def _positive(cls, v: int, info: Any) -> int:
        if v < 1:
            raise ConfigError(f"tensor_parallel.{info.field_name} must be >= 1, got {v}")
        return v


class DeepSpeedMoEConfig(Section):
    """``moe``: settings of DeepSpeed's fused MoE inference layers (see check_supported)."""

    path = "moe"
    model_config = ConfigDict(use_enum_values=True)
    enabled: bool = True
    ep_size: int = 1
    moe_experts: list[Any] = Field(default_factory=lambda: [1], alias="num_experts")
    type: MoETypeEnum = MoETypeEnum.standard
    ep_mp_group: Any = None
    ep_group: Any = Field(None, alias="expert_group")


class InferenceCheckpointConfig(Section):
    """``checkpoint_config`` (alias ``ckpt_config``); DeepSpeed's engine does not read it."""

    path = "checkpoint_config"
    checkpoint_dir: str | None = None
    save_mp_checkpoint_path: str | None = None
    base_dir: str | None = None


#: deprecated top-level key -> (section, key in the section), as DeepSpeed maps them
_LIFTED: dict[str, tuple[str, str]] = {
    "mp_size": ("tensor_parallel", "tp_size"),
    "mpu": ("tensor_parallel", "mpu"),
    "ep_size": ("moe", "ep_size"),
    "ep_group": ("moe", "ep_group"),
    "expert_group": ("moe", "ep_group"),
    "ep_mp_group": ("moe", "ep_mp_group"),
    "expert_mp_group": ("moe", "ep_mp_group"),
    "moe_experts": ("moe", "moe_experts"),
    "moe_type": ("moe", "type"),
}
_SECTION_ALIASES = {"tensor_parallel": "tp", "moe": None}
_FIELD_ALIASES = {"moe_experts": "num_experts", "ep_group": "expert_group"}


def _section_dict(value: Any, where: str) -> dict[str, Any]:
    """A section given as a dict, a bool (``moe: true``) or an already built section object."""
    if value is None:
        return {}
    if isinstance(value, bool) and where == "moe":
        return {"enabled": value}
    if isinstance(value, Section):
        return {k: getattr(value, k) for k in value.model_fields_set}
    if isinstance(value, dict):
        return dict(value)
    raise ConfigError(f"{where}: expected a JSON object, got {type(value).__name__} {value!r}")


def _lift_deprecated(data: dict[str, Any]) -> dict[str, Any]:
    out = dict(data)
    for old, (section, key) in _LIFTED.items():
        if old not in out:
            continue
        value = out.pop(old)
        warnings.warn(
            f"config key {old!r} is deprecated; use '{section}.{key}'",
            DeprecationWarning,
            stacklevel=4,
        )
        alias = _SECTION_ALIASES[section]
        name = section if section in out or alias not in out else alias
        nested = _section_dict(out.get(name), section)
        if key in nested or _FIELD_ALIASES.get(key) in nested:
            raise ConfigError(
                f"{old} and its replacement {section}.{key} are both set; keep only "
                f"'{section}.{key}'"
            )
        nested[key] = value
        out[name] = nested
    if "moe" in out and isinstance(out["moe"], bool):
        out["moe"] = {"enabled": out["moe"]}
    if "replace_method" in out:
        warnings.warn(
            "config key 'replace_method' is deprecated and has no effect; remove it",
            DeprecationWarning,
            stacklevel=4,
        )
    return out


class DeepSpeedInferenceConfig(Section):
    """DeepSpeed 0.19.8's inference config: keys, aliases and defaults."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    replace_with_kernel_inject: bool = Field(False, alias="kernel_inject")
    dtype: Any = torch.float16
    tensor_parallel: DeepSpeedTPConfig = Field(default_factory=DeepSpeedTPConfig, alias="tp")
    enable_cuda_graph: bool = False
    use_triton: bool = False
    triton_autotune: bool = False
    #: a ZeRO section (DeepSpeed validates it and its inference engine does not act on it)
    zero: dict[str, Any] = Field(default_factory=dict)
    triangular_masking: bool = Field(True, alias="tm")
    moe: DeepSpeedMoEConfig = Field(default_factory=DeepSpeedMoEConfig)
    keep_module_on_host: bool = False
    #: DeepSpeed's MoQ quantization section
    quant: dict[str, Any] = Field(default_factory=dict)
    #: a checkpoint description (dict, or the path of its JSON file): type, checkpoints, version
    checkpoint: str | dict[str, Any] | None = None
    base_dir: str = ""
    set_empty_params: bool = False
    save_mp_checkpoint_path: str | None = None
    checkpoint_config: InferenceCheckpointConfig = Field(
        default_factory=InferenceCheckpointConfig, alias="ckpt_config"
    )
    return_tuple: bool = True
    training_mp_size: int = 1
    replace_method: str = "auto"
    #: {layer class: names of its row-parallel linear layers} for tensor parallelism
    injection_policy: dict[Any, Any] | None = Field(None, alias="injection_dict")
    injection_policy_tuple: tuple[Any, ...] | None = None
    #: the model's own config (the engine's ``config`` attribute when given)
    config: dict[str, Any] | None = Field(None, alias="args")
    max_out_tokens: int = Field(1024, alias="max_tokens")
    min_out_tokens: int = Field(1, alias="min_tokens")
    transposed_mode: bool = False

    @model_validator(mode="before")
    @classmethod
    def _deprecated_keys(cls, data: Any) -> Any:
        # runs before Section._normalise (a subclass's "before" validators run first)
        return _lift_deprecated(data) if isinstance(data, dict) else data

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype(cls, v: Any) -> torch.dtype:
        if isinstance(v, torch.dtype):
            return v
        if isinstance(v, str):
            return DtypeEnum.from_str(v).value[0]
        raise ConfigError(
            f"dtype: expected a torch.dtype or a name such as 'fp16', got {type(v).__name__} {v!r}"
        )

    @field_validator("max_out_tokens")
    @classmethod
    def _max_tokens(cls, v: int) -> int:
        if v <= 0:
            raise ConfigError(f"max_out_tokens (max_tokens) must be > 0, got {v}")
        return v

    def check_supported(self, accelerator: Any) -> None:
        """Refuse, naming the key and the fix, what DeepSpeed would act on and ds_all cannot:
        the fused inference kernels and what only they read, int8 quantization, and
        sections whose work is not implemented. Called by the engine before it changes the
        model."""
        for message in _unsupported(self, accelerator):
            raise ConfigError(message)


_KERNELS = "DeepSpeed's fused inference kernels, which ds_all does not provide"


def _unsupported(cfg: DeepSpeedInferenceConfig, accelerator: Any) -> list[str]:
    out: list[str] = []
    if cfg.replace_with_kernel_inject:
        out.append(
            f"replace_with_kernel_inject (kernel_inject): {_KERNELS}; set it to false "
            "(tensor_parallel.tp_size still splits the model with AutoTP)"
        )
    if cfg.dtype == torch.int8:
        out.append(
            "dtype int8: int8 weight quantization is not implemented; use torch.float16, "
            "torch.bfloat16 or torch.float32"
        )
    elif cfg.dtype not in CONVERTIBLE_DTYPES:
        out.append(
            f"dtype {cfg.dtype}: the inference engine converts models to torch.float16, "
            "torch.bfloat16 or torch.float32; use one of them"
        )
    elif cfg.dtype not in accelerator.supported_dtypes():
        out.append(
            f"dtype {cfg.dtype} is not supported by the {accelerator.device_name()} accelerator "
            f"(it supports {accelerator.supported_dtypes()}); choose one of those"
        )
    for key in ("use_triton", "triton_autotune", "set_empty_params", "transposed_mode"):
        if getattr(cfg, key):
            out.append(f"{key}: applies to {_KERNELS}; set it to false or remove it")
    if not cfg.triangular_masking:
        out.append(f"triangular_masking (tm): applies to {_KERNELS}; remove it")
    if not cfg.return_tuple:
        out.append(
            f"return_tuple: false changes the output of {_KERNELS}; the model's own layers "
            "return what they return; remove it"
        )
    if cfg.min_out_tokens != 1:
        out.append(f"min_out_tokens (min_tokens): sizes the workspace of {_KERNELS}; remove it")
    if cfg.training_mp_size != 1:
        out.append(
            "training_mp_size: resharding Megatron model-parallel checkpoints (the fused-kernel "
            "checkpoint path) is not implemented; remove it and give the full weights in "
            "checkpoint"
        )
    if cfg.save_mp_checkpoint_path is not None:
        out.append(
            "save_mp_checkpoint_path: writing a resharded inference checkpoint is not "
            "implemented; remove it"
        )
    if cfg.checkpoint_config.model_fields_set:
        out.append(
            "checkpoint_config (ckpt_config): not read by DeepSpeed's inference engine nor "
            "here; give checkpoint and base_dir instead"
        )
    if cfg.zero:
        out.append(
            "zero: ZeRO is not applied by init_inference (DeepSpeed's inference engine does not "
            "act on it either); for ZeRO-Inference use ds_all.initialize(model=..., "
            "config={'zero_optimization': {...}}) and run engine.module, or remove the key"
        )
    if cfg.quant and cfg.quant != {"enabled": False}:
        out.append(
            "quant: quantized inference (MoQ) is not implemented; remove the section (or set "
            '{"enabled": false})'
        )
    out += _unsupported_moe(cfg.moe)
    tp = cfg.tensor_parallel
    if not tp.enabled and tp.tp_size > 1:
        out.append(
            f"tensor_parallel.enabled is false but tensor_parallel.tp_size is {tp.tp_size} "
            "(DeepSpeed splits the model by tp_size alone); set tp_size to 1 to run unsplit, "
            "or remove enabled"
        )
    if cfg.injection_policy is not None and cfg.injection_policy_tuple is not None:
        out.append(
            "injection_policy and injection_policy_tuple are both set (the engine derives the "
            "tuple from injection_policy); keep only injection_policy"
        )
    if cfg.enable_cuda_graph:
        if accelerator.device_name() != "cuda":
            out.append(
                "enable_cuda_graph: CUDA graphs need the cuda accelerator, this one is "
                f"{accelerator.device_name()}; set it to false"
            )
        elif tp.tp_size > 1 or tp.mpu is not None:
            out.append(
                "enable_cuda_graph with tensor parallelism is not supported (nor by DeepSpeed); "
                "set enable_cuda_graph to false or tensor_parallel.tp_size to 1"
            )
        elif cfg.keep_module_on_host:
            out.append(
                "enable_cuda_graph with keep_module_on_host: a CUDA graph captures a model on "
                "the GPU; set one of them to false"
            )
    return out


def _unsupported_moe(moe: DeepSpeedMoEConfig) -> list[str]:
    defaults = DeepSpeedMoEConfig()
    out = []
    for key in ("ep_size", "moe_experts", "type", "ep_mp_group", "ep_group"):
        if getattr(moe, key) != getattr(defaults, key):
            out.append(
                f"moe.{key}: sets up expert parallelism for {_KERNELS} (DeepSpeed's other "
                "inference paths do not use it); remove it (the deprecated top-level "
                f"{'moe_type' if key == 'type' else key} maps here too). ds_all.moe.MoE layers "
                "keep the ep_size they were built with"
            )
    return out
