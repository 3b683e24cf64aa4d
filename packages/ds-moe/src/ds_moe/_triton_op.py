"""What ds-moe's opt-in Triton ops share (``_bias_act``, ``_gate_linear``).

- ``register``: a ``torch.library`` op's CUDA kernel (launched on its tensors' device), its CPU
  kernel (the Triton interpreter only: the tests) and its meta kernel;
- ``probe_on_cuda``: the guard around an op's self-check, whose verdict each op caches per
  device and dtype (no CUDA or no triton: no; any failure: no);
- ``requested``: the switch, a module attribute that overrides an environment variable,
  which overrides the default.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch


def register(
    lib: torch.library.Library,
    name: str,
    run: Callable[..., Any],
    meta: Callable[..., Any],
    kernels: Callable[[], ModuleType],
) -> None:
    """Implement ``ds_moe::<name>`` with ``run`` on CUDA and, under TRITON_INTERPRET=1 only,
    on the CPU (``kernels()`` is the op's kernel module, whose ``INTERPRET`` says which), and
    with ``meta`` on the meta device. The first argument's device is the launch device."""

    def on_cuda(*args: Any) -> Any:
        with torch.cuda.device(args[0].device):  # triton launches on the current device
            return run(*args)

    def on_cpu(*args: Any) -> Any:
        if not kernels().INTERPRET:
            raise RuntimeError(
                f"ds_moe::{name} runs on CPU tensors only under TRITON_INTERPRET=1 (the tests); "
                "the layer uses it on CUDA"
            )
        return run(*args)

    lib.impl(name, on_cuda, "CUDA")
    lib.impl(name, on_cpu, "CPU")
    lib.impl(name, meta, "Meta")


def probe_on_cuda(device_type: str, check: Callable[[], bool]) -> bool:
    """``check()`` (the compiled kernels against torch) where the kernels can run at all."""
    if device_type != "cuda":
        return False  # the CPU (and anything else) keeps the unfused code
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    try:
        # the first forward may run under no_grad or inference_mode (evaluation): the check
        # needs autograd, and a failure here would be cached for the process
        with torch.inference_mode(False), torch.enable_grad():
            return check()
    except Exception:  # noqa: BLE001 - any failure means "unfused"
        return False


def requested(flag: bool | None, env_var: str, default: bool = False) -> bool:
    """A kernel switch: ``flag`` when set, else ``<env_var>`` (``1`` on, ``0`` off, anything
    else an error; read on every call), else ``default``."""
    if flag is not None:
        return flag
    value = os.environ.get(env_var)
    if value is None:
        return default
    if value not in ("0", "1"):
        raise ValueError(f"{env_var}={value!r}: set it to 1 (on) or 0 (off), or unset it")
    return value == "1"
