"""``deepspeed.runtime.compiler``: ``is_compile_supported``, DeepSpeed's check before
``engine.compile()``."""

from __future__ import annotations

import torch

__all__ = ["is_compile_supported"]


def is_compile_supported() -> bool:
    """torch 2.1 or newer (``torch.compile`` as the engine uses it)."""
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 1)
