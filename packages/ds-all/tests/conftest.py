"""Shared test set-up for ds-all.

``initialize()`` run in a plain process creates a world-of-one process group, as DeepSpeed's
does. Tests run in one pytest process, so a group one test leaves behind would change what the
next one sees (a test of "no process group" would find one): every test ends with none.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist


@pytest.fixture(autouse=True)
def _no_process_group_after_the_test():
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
