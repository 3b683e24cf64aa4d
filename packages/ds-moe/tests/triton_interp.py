"""Triton for the kernel tests: interpreted on a machine without a GPU.

Imported before anything imports triton: TRITON_INTERPRET must be set first, since triton's
own standard library (tl.sum, tl.cdiv, ...) is @jit too. Only a missing triton makes the
kernel tests skip (``needs_triton``); a kernel module that fails to import must fail them.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
try:
    import triton
except ImportError:
    triton = None

needs_triton = pytest.mark.skipif(triton is None, reason="triton is not installed")

__all__ = ["needs_triton", "triton"]
