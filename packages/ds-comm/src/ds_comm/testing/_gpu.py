"""GPU-count markers: ``@pytest.mark.gpu`` needs one CUDA device, ``@pytest.mark.gpu(n=2)`` two.

A package's ``conftest.py`` calls :func:`skip_missing_gpus` from its
``pytest_collection_modifyitems`` hook, so a test is skipped only when the machine has fewer
devices than that test needs: a one-GPU test runs on a one-GPU machine.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

GPU_MARKER_HELP = (
    "gpu(n=1): needs n CUDA devices (default 1); skipped on a machine with fewer "
    "(select with -m gpu on a GPU machine)"
)


def gpus_needed(item: Any) -> int | None:
    """How many GPUs a collected test needs (None: it is not marked ``gpu``)."""
    mark = item.get_closest_marker("gpu")
    if mark is None:
        return None
    n = mark.kwargs.get("n", mark.args[0] if mark.args else 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{item.nodeid}: @pytest.mark.gpu(n={n!r}); n must be an integer >= 1")
    return n


def skip_missing_gpus(items: Iterable[Any], device_count: int | None = None) -> None:
    """Add a skip to every ``gpu``-marked test needing more CUDA devices than there are."""
    import pytest

    if device_count is None:
        import torch

        device_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        need = gpus_needed(item)
        if need is not None and need > device_count:
            have = "no CUDA GPU" if device_count == 0 else f"{device_count} CUDA GPU(s)"
            item.add_marker(
                pytest.mark.skip(reason=f"needs {need} CUDA GPU(s), this machine has {have}")
            )
