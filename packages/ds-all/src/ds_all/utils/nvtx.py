"""``deepspeed.utils.nvtx``: ``instrument_w_nvtx``, a decorator that marks each call of the
function as an NVTX range (named by its qualified name) for Nsight timelines, where CUDA is
present and not while ``torch.compile`` traces (a range there would break the graph)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = ["instrument_w_nvtx"]

F = TypeVar("F", bound=Callable[..., Any])


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def instrument_w_nvtx(func: F) -> F:
    @functools.wraps(func)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        mark = torch.cuda.is_available() and not _compiling()
        if mark:
            torch.cuda.nvtx.range_push(func.__qualname__)
        try:
            return func(*args, **kwargs)
        finally:
            if mark:
                torch.cuda.nvtx.range_pop()

    return wrapped  # type: ignore[return-value]
