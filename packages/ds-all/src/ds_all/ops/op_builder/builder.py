"""``deepspeed.ops.op_builder.builder``: ``OpBuilder``, the probe-and-load interface DeepSpeed
clients call (``SomeBuilder().is_compatible()``, ``.load()``), over ds_kernels' op registry.

Each builder names the ds_kernels op that implements DeepSpeed's op (CPU Adam, Adagrad and
Lion share ds_kernels' ``cpu_optim``; the fused GPU optimizers share ``fused_optim``).
``is_compatible()`` is whether that op can be built (or run natively) here. ``load()``
returns ds_kernels' op object (``LoadedOp``): the compiled or native one, or, where
``is_compatible()`` is False, its pure-PyTorch fallback with a ``KernelBuildWarning``
(DeepSpeed raises there). Its call interface is ds_kernels', not the functions of DeepSpeed's
extension module: a function only DeepSpeed's extension has (``create_adam``, ...) is an
AttributeError naming what to use instead (``deepspeed.ops.adam.DeepSpeedCPUAdam``, ...).
"""

from __future__ import annotations

import sys
from typing import Any, ClassVar

import torch

import ds_kernels


class OpBuilder:
    """One DeepSpeed op, answered by the ds_kernels op ``OP``."""

    BUILD_VAR: ClassVar[str] = ""
    NAME: ClassVar[str] = ""
    #: the ds_kernels op that implements it
    OP: ClassVar[str] = ""

    def __init__(self, name: str | None = None) -> None:
        self.name = name or self.NAME
        self.jit_mode = False
        self.error_log: str | None = None

    def absolute_name(self) -> str:
        """Where the op lives: ds_kernels' registry name."""
        return f"ds_kernels.{self.OP}"

    def _status(self) -> ds_kernels.OpStatus | None:
        try:
            return ds_kernels.op_status(self.OP)
        except KeyError:  # the op's package is not installed (its entry point is missing)
            return None

    def is_compatible(self, verbose: bool = False) -> bool:
        """Whether the op can be built (or run natively) here; ``verbose`` prints why not."""
        status = self._status()
        ok = status is not None and status.compatible
        if not ok:
            self.error_log = (
                status.detail if status is not None else f"op {self.OP!r} is not registered"
            )
            if verbose:
                print(f"{self.NAME} is not compatible: {self.error_log}", file=sys.stderr)
        return ok

    #: where DeepSpeed scripts should go instead of the extension's functions
    USE_INSTEAD: ClassVar[str] = "the optimizers and functions of deepspeed.ops"

    def load(self, verbose: bool = True) -> Any:
        """The op (compiled, cached, native, or the fallback with a warning), wrapped so that
        a function of DeepSpeed's extension module that ds_kernels' op does not have raises an
        AttributeError naming what to use instead."""
        del verbose
        return LoadedOp(self.NAME, ds_kernels.load(self.OP), self.USE_INSTEAD)

    def jit_load(self, verbose: bool = True) -> Any:
        return self.load(verbose)

    @staticmethod
    def is_rocm_pytorch() -> bool:
        return torch.version.hip is not None


class LoadedOp:
    """ds_kernels' op as ``OpBuilder.load()`` returns it: its attributes pass through
    (``op.op`` is the op itself); a name only DeepSpeed's compiled extension has
    (``create_adam``, ``adam_update``, ...) is an AttributeError saying what to call."""

    def __init__(self, name: str, op: Any, use_instead: str) -> None:
        self.name = name
        self.op = op
        self._use_instead = use_instead

    def __getattr__(self, attr: str) -> Any:
        try:
            return getattr(self.op, attr)
        except AttributeError:
            raise AttributeError(
                f"{attr!r}: the {self.name} op loaded here is ds_kernels' "
                f"{type(self.op).__name__}, not DeepSpeed's compiled extension, and has no "
                f"{attr!r}; use {self._use_instead}"
            ) from None

    def __repr__(self) -> str:
        return f"LoadedOp({self.name!r}, {self.op!r})"


class CPUAdamBuilder(OpBuilder):
    BUILD_VAR = "DS_BUILD_CPU_ADAM"
    NAME = "cpu_adam"
    OP = "cpu_optim"
    USE_INSTEAD = "deepspeed.ops.adam.DeepSpeedCPUAdam"


class CPUAdagradBuilder(OpBuilder):
    BUILD_VAR = "DS_BUILD_CPU_ADAGRAD"
    NAME = "cpu_adagrad"
    OP = "cpu_optim"
    USE_INSTEAD = "deepspeed.ops.adagrad.DeepSpeedCPUAdagrad"


class CPULionBuilder(OpBuilder):
    BUILD_VAR = "DS_BUILD_CPU_LION"
    NAME = "cpu_lion"
    OP = "cpu_optim"
    USE_INSTEAD = "deepspeed.ops.lion.DeepSpeedCPULion"


class FusedAdamBuilder(OpBuilder):
    BUILD_VAR = "DS_BUILD_FUSED_ADAM"
    NAME = "fused_adam"
    OP = "fused_optim"
    USE_INSTEAD = "deepspeed.ops.adam.FusedAdam"


class FusedLambBuilder(OpBuilder):
    BUILD_VAR = "DS_BUILD_FUSED_LAMB"
    NAME = "fused_lamb"
    OP = "fused_optim"
    USE_INSTEAD = "deepspeed.ops.lamb.FusedLamb"


class FusedLionBuilder(OpBuilder):
    BUILD_VAR = "DS_BUILD_FUSED_LION"
    NAME = "fused_lion"
    OP = "fused_optim"
    USE_INSTEAD = "deepspeed.ops.lion.FusedLion"


class QuantizerBuilder(OpBuilder):
    BUILD_VAR = "DS_BUILD_QUANTIZER"
    NAME = "quantizer"
    OP = "quantizer"
    USE_INSTEAD = "ds_kernels.quantize_blockwise / dequantize_blockwise"


class AsyncIOBuilder(OpBuilder):
    """``load()`` returns a module whose ``aio_handle`` is DeepSpeed's handle over
    ``ds_offload.AsyncIO`` (the C++ engine, or the Python one where it cannot be built)."""

    BUILD_VAR = "DS_BUILD_AIO"
    NAME = "async_io"
    OP = "aio"

    def load(self, verbose: bool = True) -> Any:
        del verbose
        from ds_all.ops import _aio_handle

        return _aio_handle


__all__ = [
    "AsyncIOBuilder",
    "LoadedOp",
    "CPUAdagradBuilder",
    "CPUAdamBuilder",
    "CPULionBuilder",
    "FusedAdamBuilder",
    "FusedLambBuilder",
    "FusedLionBuilder",
    "OpBuilder",
    "QuantizerBuilder",
]
