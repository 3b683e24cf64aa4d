"""The training engine: thin orchestration over ds_zero (the model and optimizer), ds_ckpt
(checkpoints), the schedules and the monitors. The work stays in the packages."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import ds_ckpt
import ds_zero
from ds_accel import get_accelerator
from ds_all._config import DeepSpeedConfig, _owned
from ds_all._config_base import ConfigError
from ds_all._data_efficiency import DataEfficiency, DataEfficiencyEngineMixin
from ds_all._engine_buffers import buffer_fragments, load_buffers
from ds_all._engine_config import EngineConfig
from ds_all._engine_export import consolidated_state_dict, module_state_dict, write_state_dict
from ds_all._monitor import MonitorMaster
from ds_all._optimizers import build_optimizer
from ds_all._profiling import EngineProfiling
from ds_all._schedulers import build_scheduler
from ds_all._tensor_parallel import tp_checkpoint
from ds_all._timers import Timers
from ds_all.fault import on_step_boundary

log = logging.getLogger("ds_all")

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _zero_options(cfg: DeepSpeedConfig, gas: int) -> ds_zero.ZeroOptions:
    """ZeroOptions from zero_optimization plus the sections ds-all owns (precision, accumulation,
    clipping, loss scaling, communication dtype)."""
    param_dtype = (
        torch.bfloat16 if cfg.bf16.enabled else torch.float16 if cfg.fp16.enabled else None
    )
    reduce_dtype = (
        _DTYPES[cfg.communication_data_type] if cfg.communication_data_type else torch.float32
    )
    loss_scaling = None
    if cfg.fp16.enabled:
        f = cfg.fp16
        loss_scaling = ds_zero.LossScaleOptions(
            loss_scale=f.loss_scale, initial_scale_power=f.initial_scale_power,
            loss_scale_window=f.loss_scale_window, hysteresis=f.hysteresis,
            consecutive_hysteresis=f.consecutive_hysteresis, min_loss_scale=f.min_loss_scale,
        )  # fmt: skip
    options = cfg.zero_config().to_options(
        param_dtype=param_dtype, reduce_dtype=reduce_dtype, gradient_accumulation_steps=gas,
        gradient_clipping=cfg.gradient_clipping, loss_scaling=loss_scaling,
    )  # fmt: skip
    section = cfg.zero_config().offload_param or {}
    device = section.get("device", "none")
    if device in ("none", None):
        return options
    if options.stage != 3:
        raise ConfigError(
            f"zero_optimization.offload_param.device is {device!r} with zero_optimization.stage "
            f"{options.stage}: parameter offload partitions parameters, a ZeRO stage 3 feature; "
            'set "stage": 3 or remove offload_param'
        )
    if device == "nvme" and not _optimizer_offloaded(cfg):
        warnings.warn(
            "zero_optimization.offload_param.device 'nvme' without offload_optimizer: the fp32 "
            "masters stay on the device and stage 3 gathers parameters from them, so parameter "
            'shards are kept in CPU memory instead of NVMe; add "offload_optimizer": '
            '{"device": "nvme" (or "cpu"), ...} to swap them to NVMe',
            UserWarning,
            stacklevel=4,
        )
    # DeepSpeed's offload_param: each rank's parameter partition lives in host memory and is
    # copied to the device by the stage-3 gather before use
    # ds_offload owns the section: its checks, defaults ("pin_memory": true, as DeepSpeed's)
    # and "auto"
    from ds_offload import OffloadParamConfig

    param = _owned(OffloadParamConfig, section, "zero_optimization.offload_param").to_options()
    return dataclasses.replace(options, host_param_shards=True, pin_param_shards=param.pin_memory)


def _optimizer_offloaded(cfg: DeepSpeedConfig) -> bool:
    section = cfg.zero_config().offload_optimizer
    return bool(section) and section.get("device", "none") not in ("none", None)


def _param_store(cfg: DeepSpeedConfig) -> Any:
    """ds_offload's NVMe store for stage-3 parameter shards (ZeRO-Infinity) when offload_param
    puts them on NVMe and the optimizer is offloaded too (else None: ds_zero's host shards)."""
    section = cfg.zero_config().offload_param or {}
    if section.get("device") != "nvme" or not _optimizer_offloaded(cfg):
        return None
    from ds_offload import NvmeParamStore  # present: offload_optimizer needs it already

    return NvmeParamStore(section, aio=cfg.aio or None)


def _offload_stepper(cfg: DeepSpeedConfig, optimizer: torch.optim.Optimizer) -> Any:
    """ds_offload's stepper when zero_optimization.offload_optimizer puts the optimizer on the
    CPU or NVMe; None otherwise (the optimizer then steps on the device)."""
    if not _optimizer_offloaded(cfg):
        return None
    section = cfg.zero_config().offload_optimizer
    try:
        from ds_offload import OffloadStepper
    except ImportError:
        raise ConfigError(
            "zero_optimization.offload_optimizer needs ds-offload (pip install ds-offload)"
        ) from None
    kind = (
        "adam"
        if isinstance(optimizer, torch.optim.Adam) and not isinstance(optimizer, torch.optim.AdamW)
        else "adamw"
    )
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise ConfigError(f"zero_optimization.offload_optimizer steps Adam/AdamW on the CPU; the optimizer is "
                          f"{type(optimizer).__name__}: use \"type\": \"AdamW\" or remove offload_optimizer")  # fmt: skip
    return OffloadStepper(section, optimizer=kind, aio=cfg.aio or None)


def _offload_plan(zero: ds_zero.Zero) -> dict[str, int]:
    """Where this rank's offloaded model state lives, in bytes (empty without offload)."""
    plan: dict[str, int] = {}
    for holder in (zero.stepper, zero.param_store):
        report = getattr(holder, "host_memory", None)
        if callable(report):
            plan.update(report())
    host_shards = sum(
        b.local_shard.numel() * b.local_shard.element_size()
        for b in zero.buckets
        if b.host_shard and b.local_shard is not None
    )
    if host_shards:
        plan["param_shards_host"] = plan.get("param_shards_host", 0) + host_shards
    return plan


def _log_offload_plan(zero: ds_zero.Zero, rank: int) -> None:
    plan = _offload_plan(zero)
    if not plan or rank != 0:
        return
    host = sum(v for k, v in plan.items() if not k.endswith("_nvme"))
    nvme = sum(v for k, v in plan.items() if k.endswith("_nvme"))
    parts = ", ".join(f"{k.replace('_', ' ')} {_size(v)}" for k, v in plan.items() if v)
    # ZeRO hands exact gradients over in the compute dtype (one rank, no accumulation)
    handed = getattr(zero, "grad_handover_dtypes", [])
    narrow = [str(d).removeprefix("torch.") for d in handed if d != torch.float32]
    if narrow:
        parts += f" ({narrow[0]} gradients: {len(narrow)} of {len(handed)} partitions)"
    threads = getattr(zero.stepper, "num_threads", None)
    log.info(
        "offload (rank 0): %s of host memory, %s on NVMe: %s%s", _size(host), _size(nvme), parts,
        f"; CPU optimizer threads {threads}" if threads else "",
    )  # fmt: skip


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _shared_params(module: nn.Module) -> list[list[str]]:
    """[alias, saved name] for each tied parameter name beyond the first (the checkpoint holds
    a tied tensor once, under the name ``named_parameters()`` gives it)."""
    first: dict[int, str] = {}
    out = []
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out.append([name, first[id(p)]])
        else:
            first[id(p)] = name
    return out


def _count_tokens(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """Tokens in a batch: elements of the first integer tensor argument (token ids)."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor) and not a.is_floating_point() and a.dim() >= 2:
            return a.numel()
    return 0


class DeepSpeedEngine(DataEfficiencyEngineMixin, nn.Module):
    """``engine(batch)``, ``engine.backward(loss)``, ``engine.step()``; checkpoints through
    ds_ckpt; LR schedules, throughput and loss lines, monitors."""

    def __init__(
        self,
        model: nn.Module,
        config: DeepSpeedConfig,
        optimizer: torch.optim.Optimizer | Callable[..., Any] | None = None,
        model_parameters: Any = None,
        lr_scheduler: Any = None,
        dp_group: Any = None,
        sequence_parallel: Any = None,
        *,
        norm_group: Any = None,
        mpu: Any = None,
    ) -> None:
        super().__init__()
        # DeepSpeed's pair: `config` the dict clients read, `_config` the validated object
        self._config = config
        self.config = EngineConfig(config)
        self.accelerator = get_accelerator()
        self.dp_group = dp_group
        self.mpu = mpu  # DeepSpeed's engine.mpu: the model-parallel groups, when any
        initialized = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size(dp_group) if initialized else 1
        self.global_rank = dist.get_rank() if initialized else 0
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        # sequence parallelism (ds_all/_sequence.py): dp_group spans the sp x dp ranks; a batch
        # is counted per data-parallel replica
        self.sequence_parallel_size = getattr(sequence_parallel, "sequence_parallel_size", 1)
        self.seq_parallel_group = getattr(sequence_parallel, "sp_group", None)
        self._sequence_parallel = sequence_parallel
        # DeepSpeed's engine attributes (_configure_distributed_model): seq_data_parallel_group
        # is every rank holding a parameter replica (sp x dp, the group ZeRO spans), dp_world_size
        # the data-parallel replicas (dp); without sequence parallelism both are the dp group
        world_group = dist.group.WORLD if initialized else None
        self.seq_data_parallel_group = dp_group if dp_group is not None else world_group
        self.seq_dp_world_size = self.world_size
        self.dp_world_size = self.world_size // self.sequence_parallel_size
        if (
            sequence_parallel is not None
            and sequence_parallel.get_data_parallel_group() is not None
        ):
            self.data_parallel_group = sequence_parallel.get_data_parallel_group()
        else:
            self.data_parallel_group = self.seq_data_parallel_group
        self._train_batch, self._micro, self._gas = config.resolve_batch(
            self.world_size // self.sequence_parallel_size
        )
        if self.accelerator.name == "cuda":
            self.accelerator.set_device(self.local_rank % max(1, self.accelerator.device_count()))
        self.device = torch.device(self.accelerator.current_device_name())
        model.to(self.device)
        basic = self._build_optimizer(model, optimizer, model_parameters)
        # zero_optimization.leaf_module (DeepSpeed's defaults: Hugging Face's MoE blocks): the
        # flags ds-zero reads when it picks stage-3 units. Imported here: ds_all.utils imports
        # DeepSpeed's runtime tree, which imports this module.
        from ds_all.utils.z3_leaf_module import apply_zero_leaf_module_config

        apply_zero_leaf_module_config(model, config.zero_config().leaf_module)
        self.zero = ds_zero.wrap(
            model, basic, _zero_options(config, self._gas), dp_group=dp_group,
            stepper=_offload_stepper(config, basic), param_store=_param_store(config),
            norm_group=norm_group,  # tensor-parallel ranks: clipping over the whole model
        )  # fmt: skip
        self.module = model
        self.optimizer = basic
        # clients (Accelerate) read optimizer.overflow after each boundary step, as on
        # DeepSpeed's ZeRO optimizer: True when the step was skipped (fp16 overflow)
        self.optimizer.overflow = False  # type: ignore[attr-defined]
        _log_offload_plan(self.zero, self.global_rank)
        self.lr_scheduler = self._build_scheduler(lr_scheduler)
        # DeepSpeed times the steps when wall_clock_breakdown or the flops profiler is on (its
        # config ORs them: the profile's summary prints fwd/bwd/step latencies)
        self.timers = Timers(self.wall_clock_breakdown())
        self.monitor = MonitorMaster(config, self.global_rank)
        self.global_steps = 0
        self.global_samples = 0
        self.micro_steps = 0
        self.skipped_steps = 0
        self._step_applied = False
        #: set_gradient_accumulation_boundary's value; None: counted from the step() calls
        self._boundary_override: bool | None = None
        self._destroyed = False
        self._losses: list[torch.Tensor] = []
        self._tokens = 0
        self._window_start = time.perf_counter()
        self._window_samples = 0
        self._window_tokens = 0
        self._last_loss: float | None = None
        self._profiling = EngineProfiling(self)  # flops_profiler, TFLOP/s + MFU, autotuning
        # curriculum_learning, progressive_layer_drop, random-LTD, curriculum sampling (ds-data)
        self._data_efficiency = DataEfficiency(config, self._train_batch, self._micro)

    # ---------------------------------------------------------------- construction
    def _build_optimizer(
        self, model: nn.Module, optimizer: Any, model_parameters: Any
    ) -> torch.optim.Optimizer:
        cfg = self.config.optimizer
        if optimizer is not None and cfg is not None:
            raise ConfigError("an optimizer was passed to initialize() and the config has an "
                              "\"optimizer\" section too; keep only one of them")  # fmt: skip
        params = model_parameters if model_parameters is not None else model.parameters()
        if isinstance(optimizer, torch.optim.Optimizer):
            return optimizer
        if callable(optimizer):
            return optimizer(params)
        if cfg is None:
            raise ConfigError("no optimizer: pass optimizer= to initialize() or add an \"optimizer\" "
                              "section ({\"type\": \"AdamW\", \"params\": {\"lr\": 1e-3}}) to the config")  # fmt: skip
        return build_optimizer(cfg.type, cfg.params, params, self.accelerator.name)

    def _build_scheduler(self, lr_scheduler: Any) -> Any:
        cfg = self.config.scheduler
        if lr_scheduler is not None:
            if cfg is not None:
                raise ConfigError("an lr_scheduler was passed to initialize() and the config has a "
                                  "\"scheduler\" section too; keep only one of them")  # fmt: skip
            return (
                lr_scheduler(self.optimizer)
                if callable(lr_scheduler) and not hasattr(lr_scheduler, "step")
                else lr_scheduler
            )
        if cfg is None:
            return None
        return build_scheduler(cfg.type, self.optimizer, cfg.params)

    # ---------------------------------------------------------------- batch facts
    def get_sequence_parallel_group(self) -> Any:
        return self.seq_parallel_group

    def train_batch_size(self) -> int:
        return self._train_batch

    def train_micro_batch_size_per_gpu(self) -> int:
        return self._micro

    def gradient_accumulation_steps(self) -> int:
        return self._gas

    def zero_optimization_stage(self) -> int:
        return self.zero.options.stage

    def get_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def get_global_grad_norm(self) -> float | None:
        return self.zero.grad_norm

    def was_step_applied(self) -> bool:
        return self._step_applied

    @property
    def loss_scale(self) -> float:
        return self.zero.loss_scale

    def is_gradient_accumulation_boundary(self) -> bool:
        """True when the coming backward/``step()`` ends an accumulation window: the value
        set by ``set_gradient_accumulation_boundary`` if any, else every
        ``gradient_accumulation_steps``-th ``step()`` call (DeepSpeed counts step() calls)."""
        if self._boundary_override is not None:
            return self._boundary_override
        return (self.micro_steps + 1) % self._gas == 0

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
        """Declare whether the next backward passes end the accumulation window, for callers
        that call ``step()`` only once per window (Accelerate, Hugging Face Trainer): each
        backward with ``True`` reduces the gradients and the following ``step()`` applies them
        and advances the LR schedule and ``global_steps`` once."""
        self._boundary_override = bool(is_boundary)

    def zero_gather_16bit_weights_on_model_save(self) -> bool:
        """``zero_optimization.stage3_gather_16bit_weights_on_model_save``."""
        return bool(self._config.zero_config().stage3_gather_16bit_weights_on_model_save)

    def zero_optimization_partition_weights(self) -> bool:
        return self.zero.options.stage == 3

    def zero_optimization(self) -> bool:
        return self.zero.options.stage > 0

    def bfloat16_enabled(self) -> bool:
        return bool(self._config.bf16.enabled)

    def fp16_enabled(self) -> bool:
        return bool(self._config.fp16.enabled)

    def gradient_clipping(self) -> float:
        return float(self._config.gradient_clipping)

    # ---------------------------------------------------------------- profiling (DeepSpeed's)
    @property
    def flops_profiler(self) -> Any:
        """DeepSpeed's ``engine.flops_profiler``: the FlopsProfiler (ds-profile) that prints the
        ``flops_profiler`` report; absent (AttributeError) unless ``flops_profiler_enabled()``,
        as in DeepSpeed."""
        if not self.flops_profiler_enabled():
            raise AttributeError("flops_profiler: not enabled (flops_profiler.enabled is false)")
        return self._profiling.report

    def wall_clock_breakdown(self) -> bool:
        """True when steps are timed: ``wall_clock_breakdown`` or ``flops_profiler.enabled``
        (DeepSpeed's config ORs them)."""
        return bool(self._config.wall_clock_breakdown or self._config.flops_profiler.enabled)

    def flops_profiler_enabled(self) -> bool:
        return bool(self._config.flops_profiler.enabled or self.autotuning_enabled())

    def flops_profiler_recompute_fwd_factor(self) -> float:
        return self._config.flops_profiler.recompute_fwd_factor

    def flops_profiler_profile_step(self) -> int:
        """``flops_profiler.profile_step``, or ``autotuning.start_profile_step`` when
        autotuning is enabled (DeepSpeed's value)."""
        if self.autotuning_enabled():
            return self.autotuning_start_profile_step()
        return self._config.flops_profiler.profile_step

    def flops_profiler_module_depth(self) -> int:
        return self._config.flops_profiler.module_depth

    def flops_profiler_top_modules(self) -> int:
        return self._config.flops_profiler.top_modules

    def flops_profiler_detailed(self) -> bool:
        """``flops_profiler.detailed``; False when autotuning is enabled (DeepSpeed's value)."""
        return False if self.autotuning_enabled() else self._config.flops_profiler.detailed

    def flops_profiler_output_file(self) -> str | None:
        return self._config.flops_profiler.output_file

    def _autotuning(self) -> Any:
        return self._profiling.autotune_settings

    def autotuning_enabled(self) -> bool:
        return bool(self._autotuning().enabled)

    def autotuning_start_profile_step(self) -> int:
        return self._autotuning().start_profile_step

    def autotuning_end_profile_step(self) -> int:
        return self._autotuning().end_profile_step

    def autotuning_metric_path(self) -> str:
        """``autotuning.metric_path``, default ``<cwd>/autotuning_metric.json`` (DeepSpeed's)."""
        return self._autotuning().metric_path or os.path.join(os.getcwd(), "autotuning_metric.json")

    def autotuning_model_info_path(self) -> str:
        """``autotuning.model_info_path``, default ``<cwd>/autotuning_model_info.json``."""
        path = self._autotuning().model_info_path
        return path or os.path.join(os.getcwd(), "autotuning_model_info.json")

    def autotuning_metric(self) -> str:
        return self._autotuning().metric

    def autotuning_profile_model_info(self) -> bool:
        """Autotuning is enabled and ``autotuning.model_info.profile`` is true."""
        return self.autotuning_enabled() and bool(self._autotuning().model_info.profile)

    # ---------------------------------------------------------------- training
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.timers.start("forward")
        if self.module.training:
            self._tokens += _count_tokens(args, kwargs)
        self._profiling.before_forward(self)
        kwargs = self._data_efficiency.forward_kwargs(
            self.module.training, self.global_steps, kwargs
        )
        out = self.zero(*args, **kwargs)
        self._profiling.after_forward(self)
        self.timers.stop("forward")
        return out

    def backward(
        self, loss: torch.Tensor, retain_graph: bool = False, scale_wrt_gas: bool = True
    ) -> torch.Tensor:
        """Backward of ``loss``, divided by the accumulation steps unless ``scale_wrt_gas`` is
        False (the caller already averaged over the window); returns the loss as scaled, as
        DeepSpeed does. ``retain_graph`` keeps the graph for another backward."""
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError(f"engine.backward expects a scalar loss tensor, got "
                             f"{getattr(loss, 'shape', type(loss).__name__)}")  # fmt: skip
        self.timers.start("backward")
        # the engine owns the boundary (step-count or set_gradient_accumulation_boundary);
        # ZeRO reduces and marks the step ready accordingly
        self.zero.set_gradient_accumulation_boundary(self.is_gradient_accumulation_boundary())
        self._losses.append(loss.detach())
        sp = self.sequence_parallel_size
        self.zero.backward(
            loss * sp if sp > 1 else loss,  # summed over sp ranks, see _sequence.py
            retain_graph=retain_graph, scale_wrt_gas=scale_wrt_gas,
        )  # fmt: skip
        self.timers.stop("backward")
        return loss / self._gas if scale_wrt_gas else loss

    def step(self, lr_kwargs: dict[str, Any] | None = None) -> None:
        """Optimizer step at the accumulation boundary (clipping, loss scale, scheduler)."""
        self.timers.start("step")
        boundary = self.is_gradient_accumulation_boundary()
        applied = self.zero.step() if boundary else False
        self.micro_steps += 1
        self._step_applied = applied
        if boundary:
            self._data_efficiency.on_boundary(self.global_steps)  # PLD theta, as DeepSpeed
            self.optimizer.overflow = not applied  # type: ignore[attr-defined]
            if applied:
                if self.lr_scheduler is not None:
                    self.lr_scheduler.step(**(lr_kwargs or {}))
            else:
                self.skipped_steps += 1
            self.global_steps += 1
            self.global_samples += self._train_batch
            self._window_samples += self._train_batch
            self._window_tokens += self._tokens * self.world_size
            self._tokens = 0
            self._after_boundary()
            self._profiling.after_boundary(self)
            on_step_boundary(self)  # fault tolerance: save on SIGTERM, control-flow check
        self.timers.stop("step")

    def _after_boundary(self) -> None:
        spp = self.config.steps_per_print
        losses, self._losses = self._losses, []
        loss = torch.stack(losses).float().mean() if losses else None
        if loss is not None and (self.global_steps % spp == 0 or self.monitor.enabled):
            if self.world_size > 1:
                loss = loss.to(self.device)
                dist.all_reduce(loss, group=self.dp_group)
                loss = loss / self.world_size
            self._last_loss = float(loss)
            self.monitor.write_events([
                ("Train/Samples/train_loss", self._last_loss, self.global_samples),
                ("Train/Samples/lr", self.get_lr()[0], self.global_samples),
            ])  # fmt: skip
        if self.global_steps % spp == 0 and self.global_rank == 0:
            elapsed = max(1e-9, time.perf_counter() - self._window_start)
            parts = [f"step {self.global_steps}"]
            if self._last_loss is not None:
                # all-reduced over the data-parallel ranks: say so, a script's own progress
                # line usually shows rank 0's loss only
                label = f"mean loss over {self.world_size} ranks" if self.world_size > 1 else "loss"
                parts.append(f"{label} {self._last_loss:.4f}")
            parts.append(f"lr {self.get_lr()[0]:.3e}")
            parts.append(f"{self._window_samples / elapsed:.1f} samples/s")
            if self._window_tokens:
                parts.append(f"{self._window_tokens / elapsed:.0f} tokens/s")
            parts += self._profiling.throughput_parts(self, self._window_samples, elapsed)
            if self.zero.grad_norm is not None:
                parts.append(f"grad_norm {self.zero.grad_norm:.3f}")
            if self.config.fp16.enabled:
                parts.append(f"loss_scale {self.loss_scale:g} skipped {self.skipped_steps}")
            log.info(" | ".join(parts))
            if self.timers.enabled:
                log.info(self.timers.summary())
                self.timers.reset()
            self._window_start = time.perf_counter()
            self._window_samples = self._window_tokens = 0

    def train(self, mode: bool = True) -> DeepSpeedEngine:
        self.module.train(mode)
        return self

    def eval(self) -> DeepSpeedEngine:
        return self.train(False)

    # ---------------------------------------------------------------- checkpoints
    def _engine_state(self) -> dict[str, Any]:
        return {
            "global_steps": self.global_steps,
            "global_samples": self.global_samples,
            "micro_steps": self.micro_steps,
            "skipped_steps": self.skipped_steps,
            "zero_global_steps": self.zero.global_steps,
            "lr_scheduler": self.lr_scheduler.state_dict()
            if self.lr_scheduler is not None
            else None,
            "loss_scaler": self.zero.scaler.state_dict(),
            "param_groups": [
                {k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups
            ],
            "world_size": self.world_size,
            "zero_stage": self.zero.options.stage,
            "data_efficiency": self._data_efficiency.state_dict(),
            # for offline consolidation (zero_to_fp32): tied names and frozen parameters
            "shared_params": _shared_params(self.module),
            "frozen_params": [n for n, p in self.module.named_parameters() if not p.requires_grad],
        }

    def save_checkpoint(self, save_dir: str, tag: str | None = None, client_state: dict[str, Any] | None = None,
                        save_latest: bool = True, exclude_frozen_parameters: bool = False) -> bool:  # fmt: skip
        """Every rank writes its fragments; rank 0 commits the tag and moves ``latest``."""
        del exclude_frozen_parameters
        tag = tag or f"global_step{self.global_steps}"
        state = {"client_state": dict(client_state or {}), "engine": self._engine_state()}
        frags = self.zero.state_fragments() + buffer_fragments(self.module, self.zero.rank)
        tp = tp_checkpoint(self.module, self.mpu)  # shards saved as pieces of the full tensors
        if tp is not None:
            frags = tp.for_save(frags)
        ds_ckpt.save(
            save_dir, str(tag), frags,
            state, group=self.dp_group if tp is None else None,
            async_=self.config.checkpoint.async_save, rank_state=ds_ckpt.capture_rng_state(),
            update_latest=save_latest,
        )  # fmt: skip
        return True

    def load_checkpoint(self, load_dir: str, tag: str | None = None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                        load_module_only: bool = False) -> tuple[str | None, dict[str, Any] | None]:  # fmt: skip
        """Load ``tag`` (default: latest) at this run's layout, whatever layout saved it.
        Returns (path, client_state), or (None, None) when there is no checkpoint."""
        del load_module_strict
        try:
            tag_dir, _manifest = ds_ckpt.open_checkpoint(load_dir, tag)
        except ds_ckpt.CheckpointNotFoundError:
            if tag is not None:
                raise
            log.warning("load_checkpoint: no checkpoint under %s; starting from scratch", load_dir)
            return None, None
        resolved = os.path.basename(tag_dir)
        weights_only = load_module_only or not load_optimizer_states
        state: dict[str, Any] = {}

        def fill(frags: list[Any]) -> None:
            want = [f for f in frags if not (weights_only and f.name.startswith("optimizer."))]
            tp = tp_checkpoint(self.module, self.mpu)
            if tp is not None:
                want = tp.for_load(want)
            state.update(
                ds_ckpt.load(
                    load_dir, resolved, want, verify_hashes=self.config.checkpoint.verify_hashes
                )
                or {}
            )

        self.zero.load_state_fragments(fill)
        load_buffers(self.module, load_dir, resolved, set(_manifest.tensors))
        eng = state.get("engine", {})
        if not load_module_only:
            self.global_steps = int(eng.get("global_steps", 0))
            self.global_samples = int(eng.get("global_samples", 0))
            self.micro_steps = int(eng.get("micro_steps", 0))
            self.skipped_steps = int(eng.get("skipped_steps", 0))
            self.zero.global_steps = int(eng.get("zero_global_steps", self.global_steps))
            self._data_efficiency.load_state_dict(eng.get("data_efficiency"))
            if load_optimizer_states:
                for g, saved in zip(self.optimizer.param_groups, eng.get("param_groups", [])):
                    g.update(
                        {k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items()}
                    )
                if eng.get("loss_scaler") and hasattr(self.zero.scaler, "load_state_dict"):
                    self.zero.scaler.load_state_dict(eng["loss_scaler"])
            if (
                load_lr_scheduler_states
                and self.lr_scheduler is not None
                and eng.get("lr_scheduler") is not None
            ):
                self.lr_scheduler.load_state_dict(eng["lr_scheduler"])
            rng = ds_ckpt.load_rank_state(load_dir, resolved, self.global_rank)
            if rng is not None:
                ds_ckpt.restore_rng_state(rng)
        return tag_dir, state.get("client_state", {})

    # ---------------------------------------------------------------- whole-model weights
    def module_state_dict(self, exclude_frozen_parameters: bool = False) -> dict[str, torch.Tensor]:
        """The module's weights as independent CPU tensors (stages 0-2; stage 3: use
        ``_zero3_consolidated_16bit_state_dict``)."""
        if self.zero.options.stage == 3:
            raise ValueError("module_state_dict: at ZeRO stage 3 parameters are partitioned; use "
                             "engine._zero3_consolidated_16bit_state_dict() (a collective)")  # fmt: skip
        return module_state_dict(self.module, exclude_frozen_parameters)

    def _zero3_consolidated_16bit_state_dict(
        self, exclude_frozen_parameters: bool = False
    ) -> dict[str, torch.Tensor] | None:
        """Stage 3: the whole model in the compute dtype (16-bit under bf16/fp16) on the CPU of
        rank 0, None on other ranks. A collective: every rank must call it."""
        if self.zero.options.stage != 3:
            raise ValueError("_zero3_consolidated_16bit_state_dict requires ZeRO stage 3; at stages "
                             "0-2 the module holds whole weights: engine.module_state_dict()")  # fmt: skip
        return consolidated_state_dict(self.zero, self.module, exclude_frozen_parameters)

    def save_16bit_model(self, save_dir: str, save_filename: str = "pytorch_model.bin",
                         exclude_frozen_parameters: bool = False) -> bool:  # fmt: skip
        """Write the model's weights in the compute dtype to ``save_dir/save_filename`` (rank 0;
        every rank must call it). At stage 3 only with
        ``stage3_gather_16bit_weights_on_model_save`` (else nothing is written and it returns
        False, as DeepSpeed does). ``.safetensors`` names are written as safetensors."""
        path = os.path.join(save_dir, save_filename)
        if self.zero.options.stage == 3:
            if not self.zero_gather_16bit_weights_on_model_save():
                log.info("did not save %s: zero_optimization.stage3_gather_16bit_weights_on_model_save "
                         "is false", path)  # fmt: skip
                return False
            state = self._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters)
        else:
            state = self.module_state_dict(exclude_frozen_parameters)
        if self.global_rank == 0 and state is not None:
            write_state_dict(state, path)
        if self.world_size > 1:
            dist.barrier(group=self.dp_group)
        return True

    def destroy(self) -> None:
        """Release what the engine holds beyond the model (hooks, offload buffers and swap
        files, monitors, the watchdog); the model keeps its current weights. Idempotent."""
        if self._destroyed:
            return
        self._destroyed = True
        self.close()
        if self._sequence_parallel is not None:
            # deepspeed.utils.groups stops reporting this engine's sequence-parallel groups
            from ds_all.utils.groups import _REGISTRY

            _REGISTRY.clear(self._sequence_parallel)

    def close(self) -> None:
        ds_ckpt.finalize()
        self.monitor.close()
        self.zero.close()
        fault = getattr(self, "fault", None)
        if fault is not None:
            # the watchdog thread only; the SIGTERM flag stays so that a signal landing during
            # teardown does not kill a rank whose training is complete
            fault.stop_watchdog()
