"""``deepspeed.inference.engine.InferenceEngine``: the module ``init_inference`` returns.

Construction, in DeepSpeed's order: refuse what the config asks for and ds_all cannot do;
convert the model to ``dtype``; find the tensor-parallel group; load ``checkpoint``; split the
model with AutoTP when tp_size > 1 (or ``injection_policy`` names the layers); move it to the
accelerator's current device unless ``keep_module_on_host``; give the tensor-parallel ranks
one random state.

The engine is a thin ``nn.Module`` around ``module``: ``forward`` calls it (no ``no_grad``, as
DeepSpeed's: wrap calls in ``torch.no_grad()`` / ``torch.inference_mode()`` yourself),
``generate`` (present when the model has one) passes through it.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from ds_accel import get_accelerator
from ds_all._config_base import ConfigError
from ds_all.inference._autotp import apply_autotp, plan_autotp
from ds_all.inference._checkpoint import load_checkpoint
from ds_all.inference._cuda_graph import CudaGraphRunner
from ds_all.inference._tp_group import resolve_group, share_random_state
from ds_all.inference.config import DeepSpeedInferenceConfig

__all__ = ["InferenceEngine"]


class InferenceEngine(nn.Module):
    """DeepSpeed's inference engine over ``model`` (see the module docstring)."""

    #: the (converted, possibly split) model
    module: nn.Module
    #: the tensor-parallel group (None without tensor parallelism or a process group)
    mp_group: Any
    #: the Megatron-style model-parallel unit from ``tensor_parallel.mpu``, if any
    mpu: Any
    #: the model's own config (``model.config``, or the inference config's ``config``)
    config: Any
    #: ``injection_policy`` as given
    injection_dict: dict[Any, Any] | None
    model_profile_enabled: bool
    use_cuda_events: bool

    def __init__(self, model: nn.Module, config: DeepSpeedInferenceConfig) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ConfigError(f"init_inference: model must be a torch.nn.Module, got {model!r}")
        accel = get_accelerator()
        config.check_supported(accel)
        self.module = model
        self._config = config
        self.config = getattr(model, "config", None) if config.config is None else config.config
        self.injection_dict = config.injection_policy
        self.mpu = config.tensor_parallel.mpu
        self.model_profile_enabled = False
        self.use_cuda_events = True
        self._model_times: list[float] = []
        self._start = 0.0
        self._is_compiled = False
        if hasattr(model, "generate"):
            # only then, as DeepSpeed: hasattr(engine, "generate") tells what the model can do
            self.generate = self._generate

        _convert_dtype(model, config.dtype)
        tp = config.tensor_parallel
        self.mp_group, tp.tp_size = resolve_group(tp)
        tp.tp_group = self.mp_group
        if config.checkpoint is not None:
            load_checkpoint(model, config.checkpoint, config.base_dir)
        _check_materialized(model)
        if tp.tp_size > 1 or config.injection_policy:
            # an injection_policy is checked against the model at any size, as DeepSpeed does
            plan = plan_autotp(
                model, config.injection_policy, config.injection_policy_tuple, size=tp.tp_size
            )
            if tp.tp_size > 1:
                apply_autotp(model, plan, self.mp_group, tp.tp_size)
        if not config.keep_module_on_host:
            model.to(accel.current_device_name())
        if tp.tp_size > 1:
            share_random_state(self.mp_group)
        self._graph: CudaGraphRunner | None = (
            CudaGraphRunner(model) if config.enable_cuda_graph else None
        )

    # ------------------------------------------------------------------------- running
    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        if self._graph is None:
            return self.module(*inputs, **kwargs)
        # the graph replays without running the module's hooks: time the call here instead
        start = self._sync_clock() if self.model_profile_enabled else 0.0
        outputs = self._graph(*inputs, **kwargs)
        if self.model_profile_enabled:
            self._model_times.append((self._sync_clock() - start) * 1e3)
        return outputs

    def _generate(self, *inputs: Any, **kwargs: Any) -> Any:
        if hasattr(self.module, "reset_cache"):
            self.module.reset_cache()
        ids = kwargs.get("input_ids")
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            limit = self._config.max_out_tokens
            if ids.shape[-1] > limit:
                raise RuntimeError(
                    f"generate: the input has {ids.shape[-1]} tokens, more than max_out_tokens "
                    f"({limit}); raise max_out_tokens (max_tokens) in the inference config"
                )
        return self.module.generate(*inputs, **kwargs)

    # ------------------------------------------------------------------------- profiling
    def profile_model_time(self, use_cuda_events: bool = True) -> None:
        """Record the wall time (ms, device synchronised) of every forward of the model;
        ``model_times()`` returns and clears them."""
        if not self.model_profile_enabled and self._graph is None:
            self.module.register_forward_pre_hook(self._start_timer)
            self.module.register_forward_hook(self._stop_timer)
        self.model_profile_enabled = True
        self.use_cuda_events = use_cuda_events

    def model_times(self) -> list[float]:
        if not self.model_profile_enabled:
            raise RuntimeError("model_times: call profile_model_time() first")
        times, self._model_times = self._model_times, []
        return times

    def _sync_clock(self) -> float:
        get_accelerator().synchronize()
        return time.perf_counter()

    def _start_timer(self, _module: nn.Module, _inputs: Any) -> None:
        self._start = self._sync_clock()

    def _stop_timer(self, _module: nn.Module, _inputs: Any, _output: Any) -> None:
        self._model_times.append((self._sync_clock() - self._start) * 1e3)

    # ------------------------------------------------------------------------- compiling
    def compile(
        self, backend: str | None = None, compile_kwargs: dict[str, Any] | None = None
    ) -> None:
        """``torch.compile`` the model in place (once); ``backend`` defaults to torch's."""
        from ds_all.runtime.compiler import is_compile_supported

        if not is_compile_supported():
            raise RuntimeError("compile: torch.compile needs torch 2.1 or newer")
        if self._is_compiled:
            return
        kwargs = dict(compile_kwargs or {})
        if backend is not None:
            kwargs["backend"] = backend
        self.module.compile(**kwargs)
        self._is_compiled = True

    @property
    def is_compiled(self) -> bool:
        return self._is_compiled


def _convert_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    # the floating-point parameters and buffers only, as DeepSpeed's .half()/.bfloat16()/.float()
    {torch.float16: model.half, torch.bfloat16: model.bfloat16, torch.float32: model.float}[dtype]()


def _check_materialized(model: nn.Module) -> None:
    meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if meta:
        raise ConfigError(
            f"init_inference: the model's {meta[:3]}{' ...' if len(meta) > 3 else ''} are on the "
            "meta device; give checkpoint (its weight files) to load them"
        )
