import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))

from ds_comm.testing import GPU_MARKER_HELP, skip_missing_gpus  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", GPU_MARKER_HELP)


def pytest_collection_modifyitems(config, items):
    # @pytest.mark.gpu needs one CUDA device; skipped on CPU machines
    skip_missing_gpus(items)
