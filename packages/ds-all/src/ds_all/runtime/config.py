"""``deepspeed.runtime.config``: ``DeepSpeedConfig(config, mpu=None, mesh_device=None)``, the
parsed config with DeepSpeed's flat attribute names, and the optimizer-name constants.

The config is validated by ds_all's own model (``ds_all.DeepSpeedConfig.load``: unknown or
ill-typed keys are a ``DeepSpeedConfigError`` naming the key), then exposed as DeepSpeed's
object: ``train_batch_size`` / ``train_micro_batch_size_per_gpu`` /
``gradient_accumulation_steps`` completed for the data-parallel world size, ``zero_config``,
``zero_optimization_stage``, ``float16_config``, ``monitor_config``, ... . The section objects
are ds_all's and ds_zero's models, which carry DeepSpeed's field names.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ds_all._config import DeepSpeedConfig as _Config
from ds_all._config_base import ConfigError as DeepSpeedConfigError
from ds_all._config_file import read_config_file
from ds_all.monitor.config import get_monitor_config
from ds_all.runtime.swap_tensor.aio_config import aio_dict
from ds_all.utils.logging import logger

ADAGRAD_OPTIMIZER = "adagrad"
ADAM_OPTIMIZER = "adam"
ADAMW_OPTIMIZER = "adamw"
LAMB_OPTIMIZER = "lamb"
MUADAM_OPTIMIZER = "muadam"
MUADAMW_OPTIMIZER = "muadamw"
MUSGD_OPTIMIZER = "musgd"
LION_OPTIMIZER = "lion"
MUON_OPTIMIZER = "muon"
#: DeepSpeed's optimizer names (ds_all builds the ones its ``_optimizers`` resolves; the config
#: check refuses the others by name)
DEEPSPEED_OPTIMIZERS = [
    ADAGRAD_OPTIMIZER, ADAM_OPTIMIZER, ADAMW_OPTIMIZER, LAMB_OPTIMIZER, MUADAM_OPTIMIZER,
    MUADAMW_OPTIMIZER, MUSGD_OPTIMIZER, LION_OPTIMIZER, MUON_OPTIMIZER,
]  # fmt: skip
TORCH_ADAM_PARAM = "torch_adam"
ADAM_W_MODE = "adam_w_mode"
ADAM_W_MODE_DEFAULT = True

_COMM_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _read(config: str | os.PathLike[str] | dict[str, Any]) -> dict[str, Any]:
    """The config dict from a dict, a JSON file's path, or (as DeepSpeed accepts from
    launchers) the file's text in URL-safe base64."""
    if isinstance(config, dict):
        return config
    if os.path.exists(config):
        return read_config_file(Path(config))
    try:
        data = json.loads(base64.urlsafe_b64decode(config).decode("utf-8"))
    except (binascii.Error, UnicodeDecodeError, ValueError, TypeError):
        data = None
    if not isinstance(data, dict):
        raise ValueError(
            f"DeepSpeedConfig: {str(config)[:200]!r} is not a config: no file of that name "
            "exists and it is not a JSON object in URL-safe base64; pass a dict, the path of "
            "an existing JSON/HJSON file, or base64 of one"
        )
    return data


def _data_parallel_world(param_dict: dict[str, Any], mpu: Any, mesh_device: Any) -> tuple[int, int]:
    """(global rank, data-parallel world size) as DeepSpeed derives them; (0, 1) without a
    process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    rank, world = dist.get_rank(), dist.get_world_size()
    if mpu is not None:
        if hasattr(mpu, "get_data_parallel_world_size"):
            return rank, int(mpu.get_data_parallel_world_size())
        return rank, world // int(mpu.get_sequence_parallel_world_size())
    if mesh_device is not None:
        return rank, dist.get_world_size(mesh_device.get_group(mesh_dim="data_parallel"))
    return rank, world // int(param_dict.get("sequence_parallel_size", 1))


class DeepSpeedConfig:
    """A DeepSpeed config (dict, JSON path or base64 JSON), checked and flattened."""

    def __init__(self, config: str | os.PathLike[str] | dict[str, Any], mpu: Any = None,
                 mesh_device: Any = None) -> None:  # fmt: skip
        self._param_dict = _read(config)
        cfg = _Config.load(self._param_dict)
        self.global_rank, self.world_size = _data_parallel_world(self._param_dict, mpu, mesh_device)
        batch = cfg.resolve_batch(self.world_size)
        self.train_batch_size, self.train_micro_batch_size_per_gpu = batch[0], batch[1]
        self.gradient_accumulation_steps = batch[2]
        self.steps_per_print = cfg.steps_per_print
        self.dump_state = bool(self._param_dict.get("dump_state", False))
        self.disable_allgather = bool(self._param_dict.get("disable_allgather", False))
        comm = cfg.communication_data_type
        self.communication_data_type = _COMM_DTYPES[comm] if comm else None
        self.prescale_gradients = cfg.prescale_gradients
        self.gradient_predivide_factor = cfg.gradient_predivide_factor
        self.zero_config = _zero_config(cfg)
        self.zero_optimization_stage = int(self.zero_config.stage)
        self.zero_enabled = self.zero_optimization_stage > 0
        self.zero_allow_untested_optimizer = cfg.zero_allow_untested_optimizer
        self.activation_checkpointing_config = cfg.activation_checkpointing
        self.monitor_config = get_monitor_config(self._param_dict)
        self.gradient_clipping = cfg.gradient_clipping
        self.float16_config = cfg.fp16
        self.bfloat16_config = cfg.bf16
        opt, sched = cfg.optimizer, cfg.scheduler
        name = opt.type if opt is not None else None
        self.optimizer_name = (
            name.lower() if name and name.lower() in DEEPSPEED_OPTIMIZERS else name
        )
        self.optimizer_params = dict(opt.params) if opt is not None else None
        self.optimizer_legacy_fusion = opt.legacy_fusion if opt is not None else False
        self.scheduler_name = sched.type if sched is not None else None
        self.scheduler_params = dict(sched.params) if sched is not None else None
        self.flops_profiler_config = cfg.flops_profiler
        self.wall_clock_breakdown = cfg.wall_clock_breakdown or cfg.flops_profiler.enabled
        self.memory_breakdown = bool(self._param_dict.get("memory_breakdown", False))
        self.pipeline = cfg.pipeline.model_dump()
        tag_validation = cfg.checkpoint.tag_validation.lower()
        self.checkpoint_tag_validation_enabled = tag_validation != "ignore"
        self.checkpoint_tag_validation_fail = tag_validation == "fail"
        self.load_universal_checkpoint = cfg.checkpoint.load_universal
        self.use_node_local_storage = cfg.checkpoint.use_node_local_storage
        self.grad_accum_dtype = cfg.data_types.grad_accum_dtype
        self.aio_config = _aio_dict(cfg)
        self.dataloader_drop_last = cfg.dataloader_drop_last

    def print_user_config(self) -> None:
        logger.info("  json = %s", json.dumps(self._param_dict, sort_keys=True, indent=4))

    def print(self, name: str) -> None:
        """Log every attribute, then the user's JSON (DeepSpeed's startup dump)."""
        logger.info("%s:", name)
        for arg in sorted(vars(self)):
            if arg != "_param_dict":
                logger.info("  %s %s %s", arg, "." * (29 - len(arg)), getattr(self, arg))
        self.print_user_config()


def _zero_config(cfg: _Config) -> Any:
    """ds_zero's ``zero_optimization`` model, its offload sections as ds_offload's models (as
    DeepSpeed's ``zero_config.offload_optimizer.device`` reads them; None when absent)."""
    from ds_offload import OffloadOptimizerConfig, OffloadParamConfig

    zero = cfg.zero_config()
    update = {}
    for key, model in (("offload_optimizer", OffloadOptimizerConfig),
                       ("offload_param", OffloadParamConfig)):  # fmt: skip
        section = getattr(zero, key)
        if isinstance(section, dict):
            update[key] = model.from_dict(section, f"zero_optimization.{key}")
    return zero.model_copy(update=update) if update else zero


def _aio_dict(cfg: _Config) -> dict[str, Any]:
    """The ``aio`` section as DeepSpeed's dict."""
    aio = cfg.aio_config()
    if isinstance(aio, dict):  # ds_offload's pydantic models unavailable: the raw section
        return aio
    return aio_dict(aio)


__all__ = [
    "ADAGRAD_OPTIMIZER",
    "ADAMW_OPTIMIZER",
    "ADAM_OPTIMIZER",
    "ADAM_W_MODE",
    "ADAM_W_MODE_DEFAULT",
    "DEEPSPEED_OPTIMIZERS",
    "DeepSpeedConfig",
    "DeepSpeedConfigError",
    "LAMB_OPTIMIZER",
    "LION_OPTIMIZER",
    "MUADAMW_OPTIMIZER",
    "MUADAM_OPTIMIZER",
    "MUON_OPTIMIZER",
    "MUSGD_OPTIMIZER",
    "TORCH_ADAM_PARAM",
]
