"""The multi-process test harness every ds-* package uses.

``distributed_test`` (a pytest decorator), ``run_distributed`` (a function) and the ``dist_run``
fixture (``pytest_plugins = ["ds_comm.testing.pytest_plugin"]``) spawn N ranks with gloo, give
each a hard timeout, report every rank's traceback when one fails, and leave no process behind.
"""

from ds_comm.testing._decorator import distributed_test
from ds_comm.testing._spawn import (
    DEFAULT_TIMEOUT,
    DistributedTestError,
    DistributedTimeout,
    free_port,
    run_distributed,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "DistributedTestError",
    "DistributedTimeout",
    "distributed_test",
    "free_port",
    "run_distributed",
]
