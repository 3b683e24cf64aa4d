"""Test setup: one private JIT cache per test session (the C++ op is built once, then
reused), and Triton's interpreter on machines without a GPU so the Triton kernels still run
(on CPU tensors) in tier-1 tests."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

# Both must be set before ds_kernels loads an op; conftest is imported before the tests.
_SESSION_CACHE = tempfile.mkdtemp(prefix="ds_kernels_test_cache_")
os.environ["DS_KERNELS_CACHE"] = _SESSION_CACHE
os.environ.pop("DS_KERNELS_FORCE_FALLBACK", None)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def session_cache() -> str:
    return _SESSION_CACHE


@pytest.fixture(scope="session")
def cpu_op():
    """The compiled cpu_optim op, built once per session into the session cache."""
    import shutil

    import ds_kernels

    if (
        shutil.which(os.environ.get("CXX") or "c++") is None
        and os.environ.get("DS_REQUIRE_SYSTEM_TOOLS") != "1"
    ):
        pytest.skip("no C++ compiler on this machine")
    op = ds_kernels.load("cpu_optim")
    assert op.backend is not ds_kernels.Backend.FALLBACK, f"cpu_optim did not build: {op.detail}"
    return op
