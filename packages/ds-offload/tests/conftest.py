import os

# The C++ IO library and ds_kernels' cpu_optim op are built once into the shared kernel cache
# (~/.cache/ds_kernels or $DS_KERNELS_CACHE), like in real use, so reruns do not rebuild them.
os.environ.setdefault("OMP_NUM_THREADS", "1")  # other engineers share the two cores


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
