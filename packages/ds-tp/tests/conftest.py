from ds_comm.testing import GPU_MARKER_HELP, skip_missing_gpus


def pytest_configure(config):
    config.addinivalue_line("markers", GPU_MARKER_HELP)


def pytest_collection_modifyitems(config, items):
    # per test: @pytest.mark.gpu needs one CUDA device, @pytest.mark.gpu(n=2) two
    skip_missing_gpus(items)
