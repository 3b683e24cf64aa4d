"""The multi-process test harness every ds-* package uses.

``distributed_test`` (a pytest decorator), ``run_distributed`` (a function) and the ``dist_run``
fixture (``pytest_plugins = ["ds_comm.testing.pytest_plugin"]``) spawn N ranks with gloo, give
each a hard timeout, report every rank's traceback when one fails, and leave no process behind.
``run_readme_example`` runs a package README's marked example (under torchrun when it is
multi-rank); ``skip_missing_gpus`` implements ``@pytest.mark.gpu(n=N)`` in a conftest.
"""

from ds_comm.testing._decorator import distributed_test
from ds_comm.testing._gpu import GPU_MARKER_HELP, gpus_needed, skip_missing_gpus
from ds_comm.testing._readme import (
    ExampleRun,
    ReadmeExample,
    ReadmeExampleError,
    extract_readme_example,
    run_readme_example,
)
from ds_comm.testing._spawn import (
    DEFAULT_TIMEOUT,
    DistributedTestError,
    DistributedTimeout,
    free_port,
    run_distributed,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "GPU_MARKER_HELP",
    "DistributedTestError",
    "DistributedTimeout",
    "ExampleRun",
    "ReadmeExample",
    "ReadmeExampleError",
    "distributed_test",
    "extract_readme_example",
    "free_port",
    "gpus_needed",
    "run_distributed",
    "run_readme_example",
    "skip_missing_gpus",
]
