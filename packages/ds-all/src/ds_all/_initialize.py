"""``initialize()`` and ``add_config_arguments()``: DeepSpeed's entry points."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

import torch.distributed as dist
from torch import nn

from ds_all._config import DeepSpeedConfig
from ds_all._config_base import ConfigError
from ds_all._dataloader import make_dataloader
from ds_all._engine import DeepSpeedEngine
from ds_all._sequence import sequence_parallel_groups, zero_group
from ds_all.fault import attach as _attach_fault_tolerance

log = logging.getLogger("ds_all")


def _setup_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[ds_all] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def init_distributed(dist_backend: str | None = None, **kwargs: Any) -> None:
    """Initialise torch.distributed through ds_comm when the process was launched as a rank
    (ds-launch, torchrun, mpirun, srun); a lone process runs with a world of one."""
    if dist.is_available() and dist.is_initialized():
        return
    from ds_comm import init_distributed as _init

    _init(dist_backend=dist_backend, **kwargs)


def _launched() -> bool:
    env = os.environ
    return (
        "RANK" in env or "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env or "SLURM_PROCID" in env
    )


def _is_pipeline(model: nn.Module) -> bool:
    try:
        from ds_pipe import PipelineModule
    except ImportError:
        return False
    return isinstance(model, PipelineModule)


def initialize(
    args: Any = None,
    model: nn.Module | None = None,
    optimizer: Any = None,
    model_parameters: Any = None,
    training_data: Any = None,
    lr_scheduler: Any = None,
    mpu: Any = None,
    dist_init_required: bool | None = None,
    collate_fn: Any = None,
    config: Any = None,
    config_params: Any = None,
) -> tuple[DeepSpeedEngine, Any, Any, Any]:
    """Returns ``(engine, optimizer, training_dataloader, lr_scheduler)`` as DeepSpeed does."""
    _setup_logging()
    if model is None:
        raise ValueError("initialize(): model is required")
    if config is None:
        config = config_params
    if config is None and args is not None:
        config = getattr(args, "deepspeed_config", None)
    if config is None:
        raise ConfigError(
            "initialize(): no config; pass config=<path or dict> or args with --deepspeed_config"
        )
    cfg = DeepSpeedConfig.load(config, require_resolved=True)
    if dist_init_required is None:
        dist_init_required = _launched()
    if dist_init_required:
        # issue 12: fault_tolerance.comms_timeout (seconds) is the collective timeout
        init_distributed(timeout=cfg.fault_tolerance.comms_timeout)
    seq = sequence_parallel_groups(cfg, mpu)  # ds-seq's sp x dp groups, or None
    if seq is not None:
        dp_group = zero_group(seq)
    else:
        dp_group = mpu.get_data_parallel_group() if mpu is not None else None
    if cfg.activation_checkpointing.cpu_checkpointing:
        # The config's section takes effect without a separate checkpointing.configure() call;
        # only when set, so that a script's own configure(...) is not reset by a default config.
        from ds_all import checkpointing

        checkpointing.configure(deepspeed_config=cfg)
    if _is_pipeline(model):
        if seq is not None:
            raise ConfigError("sequence_parallel_size > 1 with a PipelineModule: sequence parallelism is not "
                              "supported with pipeline parallelism; set \"sequence_parallel_size\": 1")  # fmt: skip
        from ds_all._pipe_engine import PipelineEngine

        pipe = PipelineEngine(model, cfg, optimizer, model_parameters, lr_scheduler)
        return pipe, pipe.optimizer, None, pipe.lr_scheduler
    engine = DeepSpeedEngine(model, cfg, optimizer, model_parameters, lr_scheduler, dp_group, seq)
    _attach_fault_tolerance(engine, cfg)  # issue 12: watchdog, save on SIGTERM, auto-resume
    loader = None
    if training_data is not None:
        loader = make_dataloader(training_data, engine.train_micro_batch_size_per_gpu(), engine.world_size,
                                 dist.get_rank(dp_group) if engine.world_size > 1 else 0, collate_fn,
                                 drop_last=cfg.dataloader_drop_last)  # fmt: skip
    return engine, engine.optimizer, loader, engine.lr_scheduler


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add DeepSpeed's ``--deepspeed`` and ``--deepspeed_config`` flags to a parser."""
    group = parser.add_argument_group("DeepSpeed", "DeepSpeed configurations")
    group.add_argument(
        "--deepspeed", default=False, action="store_true", help="enable DeepSpeed (ds_all)"
    )
    group.add_argument(
        "--deepspeed_config", default=None, type=str, help="DeepSpeed JSON config file"
    )
    group.add_argument("--deepscale", default=False, action="store_true", help=argparse.SUPPRESS)
    group.add_argument("--deepscale_config", default=None, type=str, help=argparse.SUPPRESS)
    return parser
