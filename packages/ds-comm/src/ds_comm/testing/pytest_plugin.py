"""pytest fixture form of the harness: ``pytest_plugins = ["ds_comm.testing.pytest_plugin"]``.

def test_sum(dist_run):
    results = dist_run(my_module_level_fn, world_size=4, args=(3,))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from ds_comm.testing._spawn import run_distributed


@pytest.fixture
def dist_run() -> Callable[..., list[Any]]:
    """``dist_run(fn, world_size, **options)``: run_distributed with the test's defaults."""
    return run_distributed
