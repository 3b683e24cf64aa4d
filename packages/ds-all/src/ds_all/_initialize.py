"""``initialize()`` and ``add_config_arguments()``: DeepSpeed's entry points."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from torch import nn

import ds_comm
from ds_all._config import DeepSpeedConfig
from ds_all._config_base import ConfigError
from ds_all._dataloader import make_dataloader
from ds_all._engine import DeepSpeedEngine
from ds_all._sequence import sequence_parallel_groups, zero_group
from ds_all._tensor_parallel import mpu_norm_group, setup_tensor_parallel
from ds_all.fault import attach as _attach_fault_tolerance
from ds_all.utils.groups import _REGISTRY

log = logging.getLogger("ds_all")


def _setup_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[ds_all] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def init_distributed(
    dist_backend: str | None = None,
    auto_mpi_discovery: bool = True,
    distributed_port: int = 29500,
    verbose: bool = True,
    timeout: timedelta | float | None = None,
    init_method: str | None = None,
    dist_init_required: bool | None = None,
    config: Any = None,
    rank: int = -1,
    world_size: int = -1,
) -> None:
    """DeepSpeed's ``init_distributed``: the default process group, through ds_comm when the
    process was launched as a rank (ds-launch, torchrun, mpirun, srun); a process started with
    plain ``python`` becomes a world of one (rank 0), as DeepSpeed's does under MPI discovery.

    ``timeout`` defaults to ``DEEPSPEED_TIMEOUT`` minutes when set; ``rank``/``world_size``
    go with an explicit ``init_method`` (``tcp://host:port``); ``config`` is accepted (the
    comms logger is configured by initialize())."""
    del verbose, config
    if dist.is_available() and dist.is_initialized():
        return
    if dist_init_required is False:
        raise RuntimeError(
            "init_distributed(dist_init_required=False) but torch.distributed is not "
            "initialised; initialise it first or pass dist_init_required=True"
        )
    if timeout is None and os.environ.get("DEEPSPEED_TIMEOUT"):
        timeout = timedelta(minutes=float(os.environ["DEEPSPEED_TIMEOUT"]))
    if init_method is not None and rank >= 0 and world_size >= 1:
        kwargs = {"timeout": _as_timedelta(timeout)} if timeout is not None else {}
        dist.init_process_group(_backend(dist_backend), init_method=init_method, rank=rank,
                                world_size=world_size, **kwargs)  # fmt: skip
        ds_comm.teardown_at_exit()
        return
    if not _launched(auto_mpi_discovery):
        _init_world_of_one(dist_backend, distributed_port)
        return
    from ds_comm import init_distributed as _init

    _init(dist_backend=dist_backend, auto_mpi_discovery=auto_mpi_discovery, timeout=timeout,
          init_method=init_method)  # fmt: skip


def _as_timedelta(timeout: timedelta | float) -> timedelta:
    return timeout if isinstance(timeout, timedelta) else timedelta(seconds=float(timeout))


def _backend(name: str | None) -> str:
    from ds_accel import get_accelerator

    return name or get_accelerator().communication_backend_name()


def _init_world_of_one(dist_backend: str | None, port: int) -> None:
    """A process group of this process alone. The rendezvous is an in-process store, so no port
    is bound (two such scripts can run side by side); the launcher variables are set as a
    launcher would, for code that reads them."""
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):  # fmt: skip
        os.environ.setdefault(key, value)
    backend = _backend(dist_backend)
    if backend != "gloo":
        from ds_accel import get_accelerator

        get_accelerator().set_device(0)
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    # a gloo group still alive when the interpreter tears down can abort the process after the
    # script succeeded, and a plain-python script rarely destroys a group it never asked for
    ds_comm.teardown_at_exit()


def _launched(mpi: bool = True) -> bool:
    env = os.environ
    return (
        "RANK" in env
        or "SLURM_PROCID" in env
        or (mpi and ("OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env or "PMIX_RANK" in env))
    )


def _is_pipeline(model: nn.Module) -> bool:
    try:
        from ds_pipe import PipelineModule
    except ImportError:
        return False
    return isinstance(model, PipelineModule)


TORCH_DISTRIBUTED_DEFAULT_PORT = 29500  # deepspeed.constants


def initialize(
    args: Any = None,
    model: nn.Module | None = None,
    optimizer: Any = None,
    model_parameters: Any = None,
    training_data: Any = None,
    lr_scheduler: Any = None,
    distributed_port: int = TORCH_DISTRIBUTED_DEFAULT_PORT,
    mpu: Any = None,
    dist_init_required: bool | None = None,
    collate_fn: Any = None,
    config: Any = None,
    mesh_param: Any = None,
    config_params: Any = None,
) -> tuple[DeepSpeedEngine, Any, Any, Any]:
    """Returns ``(engine, optimizer, training_dataloader, lr_scheduler)`` as DeepSpeed does.

    ``distributed_port``: the rendezvous port when initialize() creates the process group of a
    process not started by a launcher (it becomes ``MASTER_PORT`` unless that is set); launched
    ranks use their launcher's ``MASTER_PORT`` (ds_comm takes no port argument).
    ``mesh_param``: DeepSpeed's ``(data_parallel, sequence_parallel)`` mesh shape; it sets
    ``sequence_parallel_size`` (and ``data_parallel_size``), whose product must be the world size.
    """
    from ds_all.runtime.zero.partition_parameters import init_context_suspended

    # called inside ``with zero.Init():`` the engine's own tensors are not redirected by it
    with init_context_suspended():
        return _initialize(args, model, optimizer, model_parameters, training_data,
                           lr_scheduler, mpu, dist_init_required, collate_fn, config,
                           config_params, distributed_port, mesh_param)  # fmt: skip


def _initialize(
    args: Any,
    model: nn.Module | None,
    optimizer: Any,
    model_parameters: Any,
    training_data: Any,
    lr_scheduler: Any,
    mpu: Any,
    dist_init_required: bool | None,
    collate_fn: Any,
    config: Any,
    config_params: Any,
    distributed_port: int = TORCH_DISTRIBUTED_DEFAULT_PORT,
    mesh_param: Any = None,
) -> tuple[DeepSpeedEngine, Any, Any, Any]:
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
    # As DeepSpeed: a process group is created unless the caller says not to (a script run with
    # plain python becomes a world of one, so clients' collectives and barriers work)
    if dist_init_required is None:
        dist_init_required = not (dist.is_available() and dist.is_initialized())
    if dist_init_required:
        # fault_tolerance.comms_timeout (seconds) bounds every collective: a rank that stops
        # answering fails the run instead of hanging it
        init_distributed(
            distributed_port=distributed_port, timeout=cfg.fault_tolerance.comms_timeout
        )
    cfg = _apply_mesh(cfg, mesh_param)
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
        if cfg.tensor_parallel.autotp_size > 1:
            raise ConfigError("tensor_parallel.autotp_size > 1 with a PipelineModule: AutoTP shards whole "
                              "models; build the stages from ds_tp layers over the topology's model "
                              "axis (PipeModelDataParallelTopology) instead")  # fmt: skip
        from ds_all._data_efficiency import refuse_with_pipeline
        from ds_all._pipe_engine import PipelineEngine

        refuse_with_pipeline(cfg)

        pipe = PipelineEngine(model, cfg, optimizer, model_parameters, lr_scheduler)
        _REGISTRY.set(None)
        return pipe, pipe.optimizer, None, pipe.lr_scheduler
    # AutoTP (tensor_parallel section or tp_model_init): ZeRO reduces over the data-parallel
    # group only and adds the tensor-parallel ranks' squared norms for clipping
    tp = setup_tensor_parallel(model, cfg, mpu)
    if tp is not None and seq is not None:
        raise ConfigError("tensor_parallel.autotp_size > 1 with sequence_parallel_size > 1 is not "
                          "supported; use one of them")  # fmt: skip
    if tp is not None:
        dp_group = tp.dp_group
    norm_group = tp.tp_group if tp is not None else mpu_norm_group(model, mpu)
    engine = DeepSpeedEngine(model, cfg, optimizer, model_parameters, lr_scheduler, dp_group, seq,
                             norm_group=norm_group, mpu=tp.groups if tp is not None else mpu)  # fmt: skip
    _REGISTRY.set(seq)  # deepspeed.utils.groups reports the engine's sequence-parallel groups
    _attach_fault_tolerance(engine, cfg)  # watchdog, save on SIGTERM, auto-resume, if configured
    loader = None
    if training_data is not None:
        # data_efficiency's curriculum sampler when enabled (ds-data), else the rank's shard
        rank = dist.get_rank(dp_group) if engine.world_size > 1 else 0
        loader = engine._data_efficiency.dataloader(
            training_data, engine.train_micro_batch_size_per_gpu(), rank, engine.world_size,
            engine.gradient_accumulation_steps(), engine.global_rank, collate_fn, cfg.dataloader_drop_last,
        )  # fmt: skip
    if training_data is not None and loader is None:
        loader = make_dataloader(training_data, engine.train_micro_batch_size_per_gpu(), engine.world_size,
                                 dist.get_rank(dp_group) if engine.world_size > 1 else 0, collate_fn,
                                 drop_last=cfg.dataloader_drop_last)  # fmt: skip
    return engine, engine.optimizer, loader, engine.lr_scheduler


def _apply_mesh(cfg: DeepSpeedConfig, mesh_param: Any) -> DeepSpeedConfig:
    """DeepSpeed's (data_parallel, sequence_parallel) mesh: ``mesh_param`` or the config's
    ``data_parallel_size`` x ``sequence_parallel_size``, which must cover the world."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if mesh_param is not None:
        shape = tuple(mesh_param) if isinstance(mesh_param, (tuple, list)) else None
        if (
            shape is None
            or len(shape) != 2
            or not all(isinstance(n, int) and n >= 1 for n in shape)
        ):
            raise ConfigError(f"initialize(mesh_param={mesh_param!r}): a (data_parallel, sequence_parallel) "
                              "pair of positive ints; or drop it and set \"sequence_parallel_size\" "
                              "(and \"data_parallel_size\") in the config")  # fmt: skip
        dp, sp = shape
        # the config's keys may repeat the mesh; sequence_parallel_size 1 is the default
        for key, have, want, unset in (("sequence_parallel_size", cfg.sequence_parallel_size, sp, 1),
                                       ("data_parallel_size", cfg.data_parallel_size, dp, None)):  # fmt: skip
            if have not in (unset, want):
                raise ConfigError(f"initialize(mesh_param={mesh_param!r}) but the config has \"{key}\": "
                                  f"{have}; set \"{key}\": {want} or drop mesh_param")  # fmt: skip
        if dp * sp != world:
            raise ConfigError(f"initialize(mesh_param={mesh_param!r}): data_parallel x sequence_parallel = "
                              f"{dp * sp} but the world size is {world}")  # fmt: skip
        return cfg.model_copy(update={"sequence_parallel_size": sp, "data_parallel_size": dp})
    if cfg.data_parallel_size is not None:
        dp, sp = cfg.data_parallel_size, cfg.sequence_parallel_size
        if dp * sp != world:
            raise ConfigError(f"data_parallel_size ({dp}) x sequence_parallel_size ({sp}) = {dp * sp} "
                              f"but the world size is {world}; set them so that their product is "
                              f"{world}, or drop data_parallel_size")  # fmt: skip
    return cfg


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
