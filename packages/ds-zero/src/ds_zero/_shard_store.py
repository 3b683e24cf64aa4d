"""Parameter-shard placement protocol: who holds stage 3's compute-dtype parameter shards.

With the fp32 masters held off the device by the stepper (optimizer offload), stage 3 still
needs each rank's compute-dtype shard as the source of every all-gather. By default that shard
is a host tensor owned by the bucket (``ZeroOptions.host_param_shards``). A ``ParamShardStore``
takes it over instead, e.g. ds-offload's NVMe store (ZeRO-Infinity's ``offload_param: {device:
nvme}``), which keeps only a few shards in memory, so neither package imports the other.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class ParamShardStore(Protocol):
    """Holds 1-D compute-dtype parameter shards under integer keys.

    Call order: ``add`` once per key (construction); then any number of ``acquire`` /
    ``release`` pairs (each all-gather) and ``write`` calls (each optimizer step, checkpoint
    load, ``GatheredParameters`` edit), with ``flush`` after each optimizer step.
    """

    def add(self, key: int, values: torch.Tensor) -> None:
        """Take the initial values (1-D, the shard's dtype, any device); copied before return."""
        ...

    def acquire(self, key: int) -> torch.Tensor:
        """A 1-D host tensor holding the shard, valid (and unchanged) until ``release(key)``."""
        ...

    def release(self, key: int, ready: Any | None = None) -> None:
        """The caller is done reading the acquired tensor once ``ready`` (an object with
        ``synchronize()``, e.g. a device event after an asynchronous copy; None: now) is."""
        ...

    def write(self, key: int, values: torch.Tensor) -> None:
        """Replace the shard's values (1-D, same numel, any float dtype or device); ``values``
        is read before return, so the caller may reuse it at once."""
        ...

    def flush(self) -> None:
        """Wait for writes in flight; an IO error surfaces here, naming the file."""
        ...

    def close(self) -> None: ...


__all__ = ["ParamShardStore"]
