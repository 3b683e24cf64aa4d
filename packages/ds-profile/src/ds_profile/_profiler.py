"""FlopsProfiler: DeepSpeed's API over the ATen op counter and per-module forward hooks.

Lifecycle (``ProfilerState``): IDLE holds nothing on the model; RUNNING has one pre-hook and
one post-hook per profiled module plus the counter on the dispatch-mode stack; STOPPED has
removed both but keeps the numbers (so ``print_model_profile`` works after ``stop_profile``, as
in DeepSpeed); ``end_profile`` drops the numbers and returns to IDLE.

The numbers live in this object, keyed by module, and are mirrored onto each module as
DeepSpeed's attributes (``__flops__``, ``__macs__``: the module's own calls, children excluded;
``__params__``, ``__expert_params__``, ``__model_expert_params__``: its parameters, children
included; ``__duration__``: its forward wall time, accumulated over calls; ``__start_time__``)
from ``start_profile``/``reset_profile`` until ``end_profile``, which deletes them. A module's
``__flops__``/``__macs__``/``__duration__`` are updated when its forward returns, as in
DeepSpeed. ``get_module_flops``/``get_module_macs``/``get_module_duration`` read them.
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


#: DeepSpeed's per-module attributes, set by reset_profile and deleted by end_profile
MODULE_ATTRS = (
    "__flops__",
    "__macs__",
    "__params__",
    "__expert_params__",
    "__model_expert_params__",
    "__start_time__",
    "__duration__",
)


@dataclass
class ModuleStats:
    """What one module did during the profiled forward passes (its own calls: a parent's
    totals add its children's, see ``FlopsProfiler.module_flops``)."""

    tally: Tally
    params: int
    expert_params: int = 0
    model_expert_params: int = 0
    duration: float = 0.0
    started: float = 0.0
    depth_open: int = 0


def _expert_parallelism(p: torch.Tensor) -> int:
    # DeepSpeed marks an expert parameter with group_name "ep_size_<n>"; 0: not an expert
    name = getattr(p, "group_name", "") or ""
    if isinstance(name, str) and name.startswith("ep_size_"):
        try:
            return int(name[len("ep_size_") :])
        except ValueError:
            return 0
    return 0


def _new_stats(module: nn.Module) -> ModuleStats:
    """Zeroed numbers for ``module``; parameters split as DeepSpeed does (an expert parameter
    counts in ``expert_params`` and, times its expert-parallel size, in ``model_expert_params``)."""
    stats = ModuleStats(Tally(), 0)
    for p in module.parameters():
        n, ep = _numel(p), _expert_parallelism(p)
        if ep:
            stats.expert_params += n
            stats.model_expert_params += n * ep
        else:
            stats.params += n
    return stats


def _publish(module: nn.Module, stats: ModuleStats) -> None:
    """Mirror ``stats`` onto ``module`` as DeepSpeed's attributes (plain instance attributes:
    a dunder name ending in ``__`` is not name-mangled)."""
    d = module.__dict__
    d["__flops__"] = stats.tally.flops
    d["__macs__"] = stats.tally.macs
    d["__params__"] = stats.params
    d["__expert_params__"] = stats.expert_params
    d["__model_expert_params__"] = stats.model_expert_params
    d["__start_time__"] = stats.started
    d["__duration__"] = stats.duration


def _unpublish(module: nn.Module) -> None:
    for name in MODULE_ATTRS:
        module.__dict__.pop(name, None)


def get_module_flops(module: nn.Module) -> int:
    """DeepSpeed's ``get_module_flops``: forward FLOPs of ``module`` and every module inside it
    (each module counted once however often it is reached), from the ``__flops__`` attributes
    a profile sets (AttributeError when no profile was started on it, as in DeepSpeed)."""
    return sum(m.__flops__ for m in module.modules())


def get_module_macs(module: nn.Module) -> int:
    """DeepSpeed's ``get_module_macs``: forward MACs of ``module`` and every module inside it."""
    return sum(m.__macs__ for m in module.modules())


def get_module_duration(module: nn.Module) -> float:
    """DeepSpeed's ``get_module_duration``: the module's forward latency (seconds), or, for a
    container that never runs itself (``ModuleList``), the sum of its children's."""
    duration = module.__duration__
    if duration == 0:
        for child in module.children():
            duration += get_module_duration(child)
    return duration


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


class ProfileNotStartedError(RuntimeError, AttributeError):
    """Numbers asked for outside a profile. An ``AttributeError`` too: DeepSpeed's profiler
    raises one there (the per-module attributes it reads do not exist yet), so code written
    for it that catches ``AttributeError`` keeps working."""


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
        """Zero every module's numbers and DeepSpeed's attributes on it (a running profile
        keeps running)."""
        self._stats = {m: _new_stats(m) for m in self.model.modules()}
        for m, stats in self._stats.items():
            _publish(m, stats)
        if self._counter is not None:
            self._counter.backward = Tally()
            self._counter.per_op.clear()

    def end_profile(self) -> None:
        """Stop, and drop every number: DeepSpeed's attributes are deleted from every module,
        nothing of the profile is left on the model."""
        if self.state is ProfilerState.IDLE:
            return
        self.stop_profile()
        for m in set(self._stats) | set(self.model.modules()):
            _unpublish(m)
        self._stats = {}
        self._counter = None
        self.state = ProfilerState.IDLE
        log.info("Flops profiler finished")

    # ------------------------------------------------------------------ hooks
    def _enter(self, module: nn.Module, counter: OpCounter) -> Any:
        def pre_hook(mod: nn.Module, args: Any) -> None:
            stats = self._stats.get(module)
            if stats is None:  # a module added after start_profile
                stats = self._stats[module] = _new_stats(module)
            counter.stack.append(stats.tally)
            stats.depth_open += 1
            if stats.depth_open == 1:  # a module re-entered recursively times once
                _synchronize()
                stats.started = time.perf_counter()
                module.__dict__["__start_time__"] = stats.started

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
            _publish(module, stats)

        return post_hook

    # ------------------------------------------------------------------ numbers
    def _require(self, what: str) -> None:
        if self.state is ProfilerState.IDLE:
            raise ProfileNotStartedError(
                f"FlopsProfiler.{what}: call start_profile() and run the model first"
            )

    def module_flops(self, module: nn.Module) -> int:
        """Forward FLOPs of ``module`` and everything inside it."""
        return sum(self._stats[m].tally.flops for m in module.modules() if m in self._stats)

    def module_macs(self, module: nn.Module) -> int:
        return sum(self._stats[m].tally.macs for m in module.modules() if m in self._stats)

    def module_params(self, module: nn.Module) -> int:
        """Parameters of ``module`` and its children, experts included (``__params__`` +
        ``__expert_params__``)."""
        stats = self._stats.get(module)
        return stats.params + stats.expert_params if stats is not None else 0

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

    def is_expert_tensor_parallelism_enabled(self) -> bool:
        """DeepSpeed's check: the ``enable_expert_tensor_parallelism`` flag of the model's first
        MoE layer (a module whose class is, or derives from, one named ``MoE``); False without
        one."""
        for module in self.model.modules():
            is_moe = any(c.__name__ == "MoE" for c in type(module).__mro__)
            if is_moe and hasattr(module, "enable_expert_tensor_parallelism"):
                return bool(module.enable_expert_tensor_parallelism)
        return False

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
