"""FlopsProfiler: DeepSpeed's API over the ATen op counter and per-module forward hooks.

Lifecycle (``ProfilerState``): IDLE holds nothing on the model; RUNNING has one pre-hook and
one post-hook per profiled module plus the counter on the dispatch-mode stack; STOPPED has
removed both but keeps the numbers (so ``print_model_profile`` works after ``stop_profile``, as
in DeepSpeed); ``end_profile`` drops the numbers and returns to IDLE. The numbers live in this
object, keyed by module, never as attributes on the user's modules.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.hooks import RemovableHandle

from ds_profile._counter import OpCounter, Tally
from ds_profile._format import (
    duration_to_string,
    macs_to_string,
    number_to_string,
    params_to_string,
)
from ds_profile._report import aggregated_lines, print_profile

log = logging.getLogger("ds_profile")


class ProfilerState(enum.Enum):
    """IDLE: no hooks, no numbers. RUNNING: hooks installed, counter active. STOPPED: hooks
    and counter gone, numbers kept for printing and the get_total_* getters."""

    IDLE = "idle"
    RUNNING = "running"
    STOPPED = "stopped"


@dataclass
class ModuleStats:
    """What one module did during the profiled forward passes (its own calls: a parent's
    totals add its children's, see ``FlopsProfiler.module_flops``)."""

    tally: Tally
    params: int
    duration: float = 0.0
    started: float = 0.0
    depth_open: int = 0


def _synchronize() -> None:
    # latency per module means nothing while kernels are still queued on an accelerator
    acc = getattr(torch, "accelerator", None)
    if acc is not None and acc.is_available():
        acc.synchronize()
    elif torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _numel(p: torch.Tensor) -> int:
    # a ZeRO-3 partitioned parameter keeps its full size in ds_numel
    return int(getattr(p, "ds_numel", p.numel()))


class FlopsProfiler:
    """Measures FLOPs, MACs, parameters and latency of every module of ``model``.

    ``ds_engine`` (optional) supplies the world/data/model-parallel sizes, the micro-batch size
    and the backward/step latencies for the summary; ``recompute_fwd_factor`` is the share of
    the forward recomputed in backward by activation checkpointing (0 to 1), used for the
    backward FLOPs estimate (2 + factor) x forward, as DeepSpeed does.
    """

    def __init__(
        self, model: nn.Module, ds_engine: Any = None, recompute_fwd_factor: float = 0.0
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"FlopsProfiler(model): expected a torch.nn.Module, got {type(model).__name__}"
            )
        if not 0.0 <= float(recompute_fwd_factor) <= 1.0:
            raise ValueError(f"recompute_fwd_factor must be in [0, 1], got {recompute_fwd_factor}")
        self.model = model
        self.ds_engine = ds_engine
        self.recompute_fwd_factor = float(recompute_fwd_factor)
        self.state = ProfilerState.IDLE
        self._stats: dict[nn.Module, ModuleStats] = {}
        self._handles: list[RemovableHandle] = []
        self._counter: OpCounter | None = None
        self.flops = self.macs = self.params = 0

    @property
    def started(self) -> bool:
        """DeepSpeed's flag: a profile was started and not yet ended."""
        return self.state is not ProfilerState.IDLE

    # ------------------------------------------------------------------ lifecycle
    def start_profile(self, ignore_list: list[type] | None = None) -> None:
        """Install the hooks and the counter; modules whose type is in ``ignore_list`` get no
        hooks (their work is charged to the nearest profiled parent)."""
        if self.state is ProfilerState.RUNNING:
            self.stop_profile()
        self.reset_profile()
        ignored = tuple(ignore_list or ())
        counter = OpCounter()
        for module in self.model.modules():
            if type(module) in ignored:
                continue
            self._handles.append(module.register_forward_pre_hook(self._enter(module, counter)))
            self._handles.append(
                module.register_forward_hook(self._leave(module, counter), always_call=True)
            )
        counter.__enter__()
        self._counter = counter
        self.state = ProfilerState.RUNNING
        log.info("Flops profiler started")

    def stop_profile(self) -> None:
        """Remove the hooks and the counter; the numbers stay until end_profile/reset_profile."""
        if self.state is not ProfilerState.RUNNING:
            return
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        counter = self._counter
        if counter is not None:
            if _get_current_dispatch_mode() is not counter:
                raise RuntimeError(
                    "FlopsProfiler.stop_profile: another TorchDispatchMode was entered after "
                    "start_profile and is still active; exit it before stopping the profiler"
                )
            counter.__exit__(None, None, None)
        self.state = ProfilerState.STOPPED

    def reset_profile(self) -> None:
        """Zero every module's numbers (a running profile keeps running)."""
        self._stats = {
            m: ModuleStats(Tally(), sum(_numel(p) for p in m.parameters()))
            for m in self.model.modules()
        }
        if self._counter is not None:
            self._counter.backward = Tally()
            self._counter.per_op.clear()

    def end_profile(self) -> None:
        """Stop, and drop every number: nothing of the profile is left on the model."""
        if self.state is ProfilerState.IDLE:
            return
        self.stop_profile()
        self._stats = {}
        self._counter = None
        self.state = ProfilerState.IDLE
        log.info("Flops profiler finished")

    # ------------------------------------------------------------------ hooks
    def _enter(self, module: nn.Module, counter: OpCounter) -> Any:
        def pre_hook(mod: nn.Module, args: Any) -> None:
            stats = self._stats.get(module)
            if stats is None:  # a module added after start_profile
                stats = self._stats[module] = ModuleStats(Tally(), 0)
            counter.stack.append(stats.tally)
            stats.depth_open += 1
            if stats.depth_open == 1:  # a module re-entered recursively times once
                _synchronize()
                stats.started = time.perf_counter()

        return pre_hook

    def _leave(self, module: nn.Module, counter: OpCounter) -> Any:
        def post_hook(mod: nn.Module, args: Any, output: Any) -> None:
            stats = self._stats[module]
            if counter.stack and counter.stack[-1] is stats.tally:
                counter.stack.pop()
            stats.depth_open -= 1
            if stats.depth_open == 0:
                _synchronize()
                stats.duration += time.perf_counter() - stats.started

        return post_hook

    # ------------------------------------------------------------------ numbers
    def _require(self, what: str) -> None:
        if self.state is ProfilerState.IDLE:
            raise RuntimeError(
                f"FlopsProfiler.{what}: call start_profile() and run the model first"
            )

    def module_flops(self, module: nn.Module) -> int:
        """Forward FLOPs of ``module`` and everything inside it."""
        return sum(self._stats[m].tally.flops for m in module.modules() if m in self._stats)

    def module_macs(self, module: nn.Module) -> int:
        return sum(self._stats[m].tally.macs for m in module.modules() if m in self._stats)

    def module_params(self, module: nn.Module) -> int:
        return self._stats[module].params if module in self._stats else 0

    def module_duration(self, module: nn.Module) -> float:
        """Forward latency; a container that never runs itself (ModuleList) sums its children."""
        stats = self._stats.get(module)
        if stats is not None and stats.duration:
            return stats.duration
        return sum(self.module_duration(c) for c in module.children())

    def get_total_flops(self, as_string: bool = False) -> int | str:
        """Forward FLOPs of the model (2 per multiply-accumulate, plus the element-wise ops)."""
        self._require("get_total_flops")
        total = self.module_flops(self.model)
        return number_to_string(total) if as_string else total

    def get_total_macs(self, as_string: bool = False) -> int | str:
        """Forward multiply-accumulates of the model."""
        self._require("get_total_macs")
        total = self.module_macs(self.model)
        return macs_to_string(total) if as_string else total

    def get_total_duration(self, as_string: bool = False) -> float | str:
        """Forward latency of the model, in seconds."""
        self._require("get_total_duration")
        total = self.module_duration(self.model)
        return duration_to_string(total) if as_string else total

    def get_total_params(self, as_string: bool = False) -> int | str:
        """Parameters of the model held by this rank (the full size for ZeRO-3 partitions)."""
        self._require("get_total_params")
        total = self.module_params(self.model)
        return params_to_string(total) if as_string else total

    def get_total_backward_flops(self, as_string: bool = False) -> int | str:
        """ds-profile extension: FLOPs of the backward kernels that ran while profiling,
        measured (not the 2x estimate): 0 when no backward ran."""
        self._require("get_total_backward_flops")
        total = self._counter.backward.flops if self._counter else 0
        return number_to_string(total) if as_string else total

    def get_total_backward_macs(self) -> int:
        """ds-profile extension: MACs of the backward kernels that ran while profiling."""
        self._require("get_total_backward_macs")
        return self._counter.backward.macs if self._counter else 0

    def per_operator(self) -> dict[str, tuple[int, int]]:
        """ds-profile extension: (FLOPs, MACs) per ATen operator, forward and backward."""
        if self._counter is None:
            return {}
        return {k: (v.flops, v.macs) for k, v in self._counter.per_op.items()}

    # ------------------------------------------------------------------ report
    def print_model_profile(self, profile_step: int = 1, module_depth: int = -1, top_modules: int = 1,
                            detailed: bool = True, output_file: str | None = None) -> None:  # fmt: skip
        """Print the summary, the top modules per depth and (``detailed``) the module tree
        with each module's numbers, to stdout or to ``output_file`` (directories created)."""
        if self.state is ProfilerState.IDLE:
            return
        self.flops = int(self.get_total_flops())
        self.macs = int(self.get_total_macs())
        self.params = int(self.get_total_params())
        print_profile(self, profile_step, module_depth, top_modules, detailed, output_file)

    def print_model_aggregated_profile(self, module_depth: int = -1, top_modules: int = 1) -> None:
        """Top ``top_modules`` module classes by params, MACs and latency at each depth."""
        if self.state is ProfilerState.IDLE:
            print("no profile: call this function after start_profile and before end_profile")
            return
        print("\n".join(aggregated_lines(self, module_depth, top_modules)))
