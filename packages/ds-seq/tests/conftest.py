def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs an accelerator (run with DS_TEST_GPU=1)")
