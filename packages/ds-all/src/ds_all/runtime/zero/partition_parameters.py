"""``deepspeed.runtime.zero.partition_parameters``: ``Init``, ``GatheredParameters`` and the
external-parameter registry with DeepSpeed's signatures, over ds_zero."""

from __future__ import annotations

import enum
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import ds_comm
import ds_zero
from ds_accel import get_accelerator
from ds_all._config_base import ConfigError

GatheredParameters = ds_zero.GatheredParameters

# Code that patches DeepSpeed's constructor wrappers (Transformers keeps torch.arange's dtype
# under zero.Init this way) reads these names. ds_zero.Init does not redirect tensor
# constructors at all, so the originals are torch's own and the wrapper is never installed.
_orig_torch_tensor = torch.tensor
_orig_torch_empty = torch.empty
_orig_torch_zeros = torch.zeros
_orig_torch_ones = torch.ones
_orig_torch_full = torch.full
_orig_torch_arange = torch.arange
_orig_torch_eye = torch.eye


def zero_wrapper_for_fp_tensor_constructor(
    fn: Any, target_fp_dtype: torch.dtype, target_device: Any = None
) -> Any:
    """``fn`` with floating-point results cast to ``target_fp_dtype`` on ``target_device``."""

    def wrapped(*args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("device") is None and target_device is not None:
            kwargs["device"] = target_device
        t = fn(*args, **kwargs)
        return t.to(target_fp_dtype) if t.is_floating_point() else t

    return wrapped


class ZeroParamStatus(enum.Enum):
    """Whether a stage-3 parameter is whole on this rank (DeepSpeed's names)."""

    AVAILABLE = 1
    NOT_AVAILABLE = 2
    INFLIGHT = 3


def _config_dtype(config: Any) -> torch.dtype | None:
    from ds_all._config import DeepSpeedConfig

    cfg = DeepSpeedConfig.load(config)
    if cfg.bf16.enabled and cfg.fp16.enabled:
        raise ConfigError("bf16.enabled and fp16.enabled are both true; enable one of them")
    if cfg.bf16.enabled:
        return torch.bfloat16
    if cfg.fp16.enabled:
        return torch.float16
    return torch.float32


def _check_qwz_in_config(config: Any, weights: bool, nontrainable: bool) -> None:
    """ZeRO++ qwZ acts on the gathers of the engine that initialize() builds from the config
    (Init's own partitioning is exact), so Init's flags must agree with the config's keys."""
    from ds_all._config import DeepSpeedConfig

    zero = DeepSpeedConfig.load(config).zero_optimization if config is not None else {}
    for flag, key in ((weights, "zero_quantized_weights"),
                      (nontrainable, "zero_quantized_nontrainable_weights")):  # fmt: skip
        if flag and not zero.get(key):
            raise ValueError(
                f"zero.Init({key}=True): qwZ is applied by the engine initialize() builds; set "
                f'"zero_optimization": {{"{key}": true}} in the config (and pass it to Init as '
                "config_dict_or_path)"
            )


class Init(ds_zero.Init):
    """``with deepspeed.zero.Init(...):`` builds a model whose parameters are partitioned as
    each module finishes ``__init__`` (ds_zero's ``Init``), with DeepSpeed's arguments.

    The group is ``data_parallel_group``, else ``sequence_data_parallel_group``, else the data
    group of ``mpu``, else ``zero_param_parallel_group``'s data group, else the world. The
    parameter dtype is ``dtype``, else the config's (bf16/fp16/fp32), else the model's own
    (DeepSpeed falls back to fp16 there). Without a process group one is created first
    (``init_distributed``), as DeepSpeed's Init does. ``remote_device`` and ``pin_memory`` are accepted:
    shards stay on the device they were built on until ``initialize()`` places them as the
    config's ``offload_param`` says; ``mem_efficient_linear`` has nothing to change (linear
    layers are not patched)."""

    def __init__(
        self,
        module: nn.Module | None = None,
        data_parallel_group: Any = None,
        mem_efficient_linear: bool = True,
        remote_device: str | None = None,
        pin_memory: bool = False,
        config_dict_or_path: Any = None,
        config: Any = None,
        enabled: bool = True,
        dtype: torch.dtype | None = None,
        mpu: Any = None,
        zero_param_parallel_group: Any = None,
        zero_quantized_weights: bool = False,
        zero_quantized_nontrainable_weights: bool = False,
        sequence_data_parallel_group: Any = None,
        param_swapper: Any = None,
    ) -> None:
        del mem_efficient_linear, pin_memory, param_swapper, zero_param_parallel_group
        if module is not None:
            raise ValueError(
                "zero.Init(module=...): partitioning an already-built model is not supported; "
                "build it inside `with deepspeed.zero.Init():` or let initialize() partition it"
            )
        if zero_quantized_weights or zero_quantized_nontrainable_weights:
            _check_qwz_in_config(config_dict_or_path if config_dict_or_path is not None else config,
                                 zero_quantized_weights, zero_quantized_nontrainable_weights)  # fmt: skip
        if remote_device not in (None, "none", "cpu", "nvme", get_accelerator().device_name()):
            raise ValueError(f"zero.Init: remote_device {remote_device!r}: use None, 'cpu' or 'nvme'")  # fmt: skip
        if config_dict_or_path is None:
            config_dict_or_path = config
        if dtype is None and config_dict_or_path is not None:
            dtype = _config_dtype(config_dict_or_path)
        if enabled and ds_comm.launched_rank() is not None and not ds_comm.is_initialized():
            # DeepSpeed's Init initialises the process group itself when a launcher started
            # this process as one of several ranks (scripts rely on it before initialize())
            from ds_all._initialize import init_distributed

            init_distributed()
        if enabled and not (dist.is_available() and dist.is_initialized()):
            # as DeepSpeed's Init: the process group is created here when the script has not
            # (a world of one under plain python), since partitions need it
            from ds_all._initialize import init_distributed

            init_distributed()
        group = data_parallel_group or sequence_data_parallel_group
        if group is None and mpu is not None:
            group = mpu.get_data_parallel_group()
        super().__init__(dp_group=group, enabled=enabled, dtype=dtype)


def register_external_parameter(module: nn.Module, parameter: nn.Parameter) -> None:
    """Tell stage 3 that ``module``'s forward reads ``parameter`` of another module, so it is
    gathered whenever ``module`` runs. Call before ``initialize()``."""
    if not isinstance(parameter, torch.Tensor):
        raise TypeError(f"register_external_parameter: expected a Parameter, got {type(parameter).__name__}")  # fmt: skip
    external = module.__dict__.setdefault("ds_external_parameters", [])
    if not any(p is parameter for p in external):
        external.append(parameter)


def unregister_external_parameter(module: nn.Module, parameter: nn.Parameter) -> None:
    external = module.__dict__.get("ds_external_parameters", [])
    if not any(p is parameter for p in external):
        raise ValueError("unregister_external_parameter: the parameter was not registered on the module")  # fmt: skip
    external[:] = [p for p in external if p is not parameter]


__all__ = [
    "GatheredParameters",
    "Init",
    "ZeroParamStatus",
    "register_external_parameter",
    "unregister_external_parameter",
    "zero_wrapper_for_fp_tensor_constructor",
]
