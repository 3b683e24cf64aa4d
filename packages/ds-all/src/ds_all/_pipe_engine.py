"""The engine for ``PipelineModule`` models: ``train_batch`` / ``eval_batch`` over ds_pipe's
runtime, with the config's optimizer, schedule, clipping and accumulation (micro-batches), and
ds-zero stage 0 or 1 over each stage's data-parallel group (bf16 weights with fp32 masters)."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import ds_zero
from ds_accel import get_accelerator
from ds_all._config import DeepSpeedConfig
from ds_all._config_base import ConfigError
from ds_all._engine import _zero_options
from ds_all._optimizers import build_optimizer
from ds_all._schedulers import build_scheduler

log = logging.getLogger("ds_all")

_SCHEDULES = {"1f1b": "1f1b", "gpipe": "gpipe", "interleaved": "interleaved_1f1b"}


class PipelineEngine(nn.Module):
    """DeepSpeed's pipeline engine surface: ``train_batch(data_iter)`` runs one optimizer step
    over ``gradient_accumulation_steps`` micro-batches; ``eval_batch(data_iter)`` forwards them."""

    def __init__(self, model: Any, config: DeepSpeedConfig, optimizer: Any = None,
                 model_parameters: Any = None, lr_scheduler: Any = None) -> None:  # fmt: skip
        super().__init__()
        from ds_pipe import PipelineRuntime

        if config.zero_config().stage > 1:
            raise ConfigError(f"zero_optimization.stage {config.zero_config().stage} with a PipelineModule: "
                              "pipeline parallelism composes with ZeRO stage 0 or 1 only; set stage to 0 or 1")  # fmt: skip
        if config.fp16.enabled:
            raise ConfigError("fp16 with a PipelineModule is not supported yet; use bf16 or fp32")
        self.config = config
        self.module = model
        acc = get_accelerator()
        # DeepSpeed's PipelineModule carries its (pipe, data[, model]) topology: the batch
        # triangle is over the data-parallel degree, not the world
        topo = getattr(model, "topology", None)
        self.dp_world = max(1, topo.get_dim("data")) if topo is not None else 1
        self._train_batch, self._micro, self._gas = config.resolve_batch(self.dp_world)
        if acc.name == "cuda":
            model.to(acc.current_device_name())
        cfg_opt = config.optimizer
        if optimizer is None:
            if cfg_opt is None:
                raise ConfigError('no optimizer: pass optimizer= or add an "optimizer" section')
            optimizer = build_optimizer(
                cfg_opt.type, cfg_opt.params, model_parameters or model.parameters(), acc.name
            )
        elif callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer):
            optimizer = optimizer(model_parameters or model.parameters())
        self.optimizer = optimizer
        schedule = _SCHEDULES[config.pipeline.schedule]
        stage = config.zero_config().stage
        self.zero: ds_zero.Zero | None = None
        if getattr(model, "tied", None) and topo is not None and topo.get_dim("model") > 1:
            raise ConfigError("a PipelineModule with TiedLayerSpec and a tensor (model) axis in its "
                              "topology is not supported: untie the layers or drop the model axis")  # fmt: skip
        if getattr(model, "tied", None):
            # ds-zero takes gradients in backward hooks, before ds-pipe sums tied weights over
            # their stages: tied models keep ds-pipe's own reduction, clipping and fp32 step
            if stage == 1 or config.bf16.enabled:
                raise ConfigError(
                    "a PipelineModule with TiedLayerSpec trains with ZeRO stage 0 in fp32 only "
                    f"(zero_optimization.stage is {stage}, bf16.enabled is "
                    f"{config.bf16.enabled}): set stage 0 and bf16.enabled false, or untie the "
                    "layers"
                )
            self.runtime = PipelineRuntime(
                model, optimizer, micro_batches=self._gas, schedule=schedule,
                max_grad_norm=config.gradient_clipping or None,
            )  # fmt: skip
        else:
            # ds-zero does the data-parallel reduction (stage 0) or partitions the optimizer
            # state over it (stage 1), keeps bf16 compute weights with fp32 masters, and clips
            # by the norm over every stage (norm_group = this rank's pipeline)
            self.runtime = PipelineRuntime(
                model, None, micro_batches=self._gas, schedule=schedule,
                reduce_data_parallel=False,
            )  # fmt: skip
            grid = self.runtime.grid
            norm_group = grid.pipe_group
            if grid.model_parallel_size > 1:
                # a tensor (model) axis: the norm spans every stage and slice of the replica;
                # parameters the slices hold whole (not ds-tp shards) count once
                from ds_all._tensor_parallel import mark_replicated

                mark_replicated(model, grid.model_parallel_size)
                norm_group = grid.model_parallel_group
            self.zero = ds_zero.wrap(
                model, optimizer, _zero_options(config, self._gas),
                dp_group=grid.data_parallel_group, norm_group=norm_group,
            )  # fmt: skip
        self.lr_scheduler = (build_scheduler(config.scheduler.type, optimizer, config.scheduler.params)
                             if config.scheduler is not None and lr_scheduler is None else lr_scheduler)  # fmt: skip
        self.global_steps = 0
        self.global_samples = 0
        self.global_rank = dist.get_rank() if dist.is_initialized() else 0
        self._t0 = time.perf_counter()

    def train_micro_batch_size_per_gpu(self) -> int:
        return self._micro

    def gradient_accumulation_steps(self) -> int:
        return self._gas

    def train_batch_size(self) -> int:
        return self._train_batch

    def get_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def train_batch(self, data_iter: Any = None) -> torch.Tensor:
        loss = self.runtime.train_batch(data_iter)
        if self.zero is not None:
            self.zero.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.global_steps += 1
        self.global_samples += self._train_batch
        if self.global_steps % self.config.steps_per_print == 0 and self.global_rank == 0:
            dt = time.perf_counter() - self._t0
            log.info(f"step {self.global_steps} | loss {float(loss):.4f} | lr {self.get_lr()[0]:.3e} | "
                     f"{self.config.steps_per_print * self._train_batch / max(dt, 1e-9):.1f} samples/s")  # fmt: skip
            self._t0 = time.perf_counter()
        return loss

    def eval_batch(self, data_iter: Any = None, return_logits: bool = False) -> Any:
        return self.runtime.eval_batch(data_iter, return_outputs=return_logits)

    def is_gradient_accumulation_boundary(self) -> bool:
        return True
