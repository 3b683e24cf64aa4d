"""The engine's profiling glue: the ``flops_profiler`` section, the TFLOP/s and MFU of the
throughput line, and the measurements an autotuning trial reports before it exits.

The engine calls four methods (``before_forward``, ``after_forward``, ``after_boundary``,
``throughput_parts``); everything else stays here. Counting uses ds-profile's FlopsProfiler,
which installs nothing outside the steps it measures:

* the ``flops_profiler`` report: rank 0 profiles the forward passes of global step
  ``profile_step`` (each micro-batch restarts the count, so the last one is reported, as in
  DeepSpeed) and prints at that step's boundary;
* the throughput line: rank 0 counts one training forward (the first) and charges every later
  micro-step ``(3 + recompute_fwd_factor)`` times that, DeepSpeed's training-FLOPs convention;
  this assumes micro-batches of one shape;
* autotuning trials: see ``AutotuneProbe``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ds_accel import peak_flops
from ds_all._config import DeepSpeedConfig
from ds_all._profiling_config import autotuning_settings
from ds_profile import FlopsProfiler, training_flops_per_step

if TYPE_CHECKING:
    from ds_all._engine import DeepSpeedEngine
    from ds_profile.autotune import AutotuneSettings

log = logging.getLogger("ds_all")


class _EngineView:
    """What the profile summary reads from the engine (DeepSpeed's attribute names)."""

    def __init__(self, engine: DeepSpeedEngine) -> None:
        self._engine = engine
        self.world_size = engine.world_size
        self.dp_world_size = engine.world_size // max(1, engine.sequence_parallel_size)
        self.mp_world_size = 1

    def train_micro_batch_size_per_gpu(self) -> int:
        return self._engine.train_micro_batch_size_per_gpu()

    def profile_latencies(self) -> dict[str, float] | None:
        timers = self._engine.timers
        if not timers.enabled or not timers.counts.get("forward"):
            return None
        return {
            name: timers.totals[key] / max(1, timers.counts[key]) / 1000.0
            for name, key in (("fwd", "forward"), ("bwd", "backward"), ("step", "step"))
        }


def _cfg(engine: DeepSpeedEngine) -> DeepSpeedConfig:
    """The validated config (``engine._config`` where ``engine.config`` is the client view)."""
    cfg = engine.__dict__.get("_config")
    return cfg if isinstance(cfg, DeepSpeedConfig) else engine.config


def _dtype(engine: DeepSpeedEngine) -> torch.dtype:
    if _cfg(engine).bf16.enabled:
        return torch.bfloat16
    if _cfg(engine).fp16.enabled:
        return torch.float16
    return torch.float32


class _SavedBytes:
    """Bytes autograd saves for backward during one forward (activations), parameters excluded.

    Used where the device has no allocator statistics (CPU). A storage is counted once however
    many views of it are saved."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.total = 0
        self._seen: set[int] = set()
        self._ctx: Any = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        # parameters are looked up now, not once: ZeRO-3 swaps gathered storage in and out
        params = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        if ptr not in self._seen and ptr not in params:
            self._seen.add(ptr)
            self.total += storage.nbytes()
        return t

    def __enter__(self) -> _SavedBytes:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


class AutotuneProbe:
    """An autotuning trial inside the training job (``autotuning.enabled``).

    With ``model_info.profile``: the first training forward measures the activation bytes of the
    micro-batch, writes ``model_info_path`` (parameters, activation bytes per sample, device
    memory) and exits before backward and the optimizer step (so the profile run needs no more
    memory than one forward). Otherwise: the wall time from the boundary of
    step ``start_profile_step`` to that of ``end_profile_step`` gives the latency per step, the
    throughput (samples/s) and FLOP/s per device, written to ``metric_path``; then the job exits,
    as DeepSpeed's does.
    """

    def __init__(self, engine: DeepSpeedEngine, settings: AutotuneSettings) -> None:
        self.settings = settings
        self._t0: float | None = None
        self._act_before = 0
        self.activation_bytes: int | None = None
        self._saved: _SavedBytes | None = None

    def before_forward(self, engine: DeepSpeedEngine) -> None:
        if not self.settings.model_info.profile or self.activation_bytes is not None:
            return
        if engine.device.type == "cpu":
            self._saved = _SavedBytes(engine.module).__enter__()
        else:
            engine.accelerator.synchronize()
            self._act_before = engine.accelerator.memory_allocated()

    def after_forward(self, engine: DeepSpeedEngine) -> None:
        if not self.settings.model_info.profile or self.activation_bytes is not None:
            return
        if self._saved is not None:
            self._saved.__exit__(None, None, None)
            self.activation_bytes = self._saved.total
            self._saved = None
        else:
            engine.accelerator.synchronize()
            self.activation_bytes = max(0, engine.accelerator.memory_allocated() - self._act_before)
        self._write_model_info(engine)
        _exit(engine)

    def after_boundary(self, engine: DeepSpeedEngine, fwd_flops: int | None) -> None:
        s = self.settings
        if engine.global_steps == s.start_profile_step:
            engine.accelerator.synchronize()
            self._t0 = time.perf_counter()
        elif engine.global_steps == s.end_profile_step and self._t0 is not None:
            engine.accelerator.synchronize()
            latency = (time.perf_counter() - self._t0) / (s.end_profile_step - s.start_profile_step)
            if engine.global_rank == 0:
                per_step = (
                    training_flops_per_step(fwd_flops or 0) * engine.gradient_accumulation_steps()
                )
                metric = {
                    "latency": latency,
                    "throughput": engine.train_batch_size() / latency,
                    "FLOPS_per_gpu": per_step / latency,
                    "peak_mem_gb": _peak_mem_gb(engine),
                }
                _write_json(
                    s.metric_path or os.path.join(os.getcwd(), "autotuning_metric.json"), metric
                )
                log.info("autotuning: wrote %s", metric)
            _exit(engine)

    def _write_model_info(self, engine: DeepSpeedEngine) -> None:
        if engine.global_rank != 0:
            return
        params = sum(int(getattr(p, "ds_numel", p.numel())) for p in engine.module.parameters())
        trainable = sum(
            int(getattr(p, "ds_numel", p.numel()))
            for p in engine.module.parameters()
            if p.requires_grad
        )
        mbs = engine.train_micro_batch_size_per_gpu()
        info = {
            "num_params": params,
            "trainable_num_params": trainable,
            "activation_mem_per_gpu": int(math.ceil((self.activation_bytes or 0) / mbs)),
            "device_memory_bytes": int(engine.accelerator.total_memory()),
        }
        _write_json(
            self.settings.model_info_path
            or os.path.join(os.getcwd(), "autotuning_model_info.json"),
            info,
        )


def _peak_mem_gb(engine: DeepSpeedEngine) -> float:
    try:
        return engine.accelerator.max_memory_allocated() / 2**30
    except (RuntimeError, NotImplementedError):
        return 0.0


def _write_json(path: str, data: dict[str, Any]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, p)


def _exit(engine: DeepSpeedEngine) -> None:
    """End the trial on every rank once rank 0 has written its file."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.exit(0)


class EngineProfiling:
    def __init__(self, engine: DeepSpeedEngine) -> None:
        cfg = _cfg(engine).flops_profiler
        self.cfg = cfg
        self.rank0 = engine.global_rank == 0
        self.report = FlopsProfiler(engine.module, ds_engine=_EngineView(engine),
                                    recompute_fwd_factor=cfg.recompute_fwd_factor)  # fmt: skip
        self._reporting = False
        #: the ``autotuning`` section, parsed once per engine (its warnings said once); the
        #: engine's ``autotuning_*()`` accessors read it
        self.autotune_settings = autotuning_settings(_cfg(engine).autotuning)
        self.autotune = (
            AutotuneProbe(engine, self.autotune_settings)
            if self.autotune_settings.enabled
            else None
        )
        #: forward FLOPs of one micro-batch on this device, counted once (rank 0)
        self.fwd_flops: int | None = None
        self._counting: FlopsProfiler | None = None
        wants_rate = (
            math.isfinite(float(_cfg(engine).steps_per_print or math.inf))
            or self.autotune is not None
        )
        # a torch.compile'd module runs its graph without the per-op dispatch the count needs
        compiled = hasattr(engine.module, "_orig_mod")
        self._count_pending = self.rank0 and wants_rate and not compiled
        peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops else None
        if peak is None and engine.device.type == "cuda":
            peak = peak_flops(_dtype(engine), torch.cuda.get_device_name(engine.device))
        elif peak is None:
            peak = peak_flops(_dtype(engine), "")  # DS_PEAK_FLOPS or unknown
        self.peak = peak

    def _report_step(self, engine: DeepSpeedEngine) -> bool:
        return self.cfg.enabled and self.rank0 and engine.global_steps == self.cfg.profile_step

    def before_forward(self, engine: DeepSpeedEngine) -> None:
        if not engine.module.training:
            return
        if self.autotune is not None:
            self.autotune.before_forward(engine)
        if self._report_step(engine):
            self.report.start_profile()  # restarts the count at each micro-batch, as DeepSpeed
            self._reporting = True
        elif self._count_pending:
            self._counting = FlopsProfiler(engine.module)
            self._counting.start_profile()

    def after_forward(self, engine: DeepSpeedEngine) -> None:
        if self.autotune is not None and engine.module.training:
            self.autotune.after_forward(engine)
        if self._counting is not None:
            counting, self._counting, self._count_pending = self._counting, None, False
            try:
                counting.stop_profile()
            except RuntimeError as exc:  # another library's dispatch mode is still open
                log.warning("TFLOP/s and MFU left out: the forward could not be counted (%s)", exc)
                return
            self.fwd_flops = int(counting.get_total_flops())
            counting.end_profile()
        elif self._reporting and self.fwd_flops is None:
            self.fwd_flops = int(self.report.get_total_flops())

    def after_boundary(self, engine: DeepSpeedEngine) -> None:
        if self._reporting:
            self._reporting = False
            self._print_report(engine)
        if self.autotune is not None:
            self.autotune.after_boundary(engine, self.fwd_flops)

    def _print_report(self, engine: DeepSpeedEngine) -> None:
        try:
            self.report.stop_profile()
        except RuntimeError as exc:  # another library's dispatch mode is still open
            log.warning("flops_profiler: no profile printed (%s)", exc)
            return
        self.report.print_model_profile(
            profile_step=engine.global_steps, module_depth=self.cfg.module_depth,
            top_modules=self.cfg.top_modules, detailed=self.cfg.detailed,
            output_file=self.cfg.output_file,
        )  # fmt: skip
        self.report.end_profile()

    def throughput_parts(self, engine: DeepSpeedEngine, samples: int, elapsed: float) -> list[str]:
        """'X TFLOP/s/device' and 'MFU Y%' for the progress line (empty before counting)."""
        if not self.fwd_flops or elapsed <= 0:
            return []
        micro_steps = samples / engine.train_batch_size() * engine.gradient_accumulation_steps()
        rate = (
            training_flops_per_step(self.fwd_flops, self.cfg.recompute_fwd_factor)
            * micro_steps
            / elapsed
        )
        parts = [f"{rate / 1e12:.2f} TFLOP/s/device"]
        if self.peak:
            parts.append(f"MFU {100 * rate / self.peak:.1f}%")
        return parts
