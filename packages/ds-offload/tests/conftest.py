import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _kernel_cache(tmp_path_factory):
    # Build the C++ engine once per session into a private cache (no writes to ~/.cache).
    if "DS_KERNELS_CACHE" not in os.environ:
        os.environ["DS_KERNELS_CACHE"] = str(tmp_path_factory.mktemp("ds_kernels_cache"))
    yield
