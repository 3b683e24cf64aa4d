"""A store connection for the watchdog: the job's rendezvous store, with short timeouts.

The default group's store blocks for the whole collective timeout on a missing key and is
shared with torch's own bookkeeping. The watchdog opens its own client to the same TCPStore
(so a slow or frozen peer cannot block it for long) under a key prefix of its own; a store
that is not a TCPStore (a FileStore in the test harness) is used through a prefix as it is.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch.distributed as dist

PREFIX = "ds_all_fault/"


def _underlying(store: Any) -> Any:
    while hasattr(store, "underlying_store"):
        store = store.underlying_store
    return store


def open_store(timeout_s: float = 10.0) -> Any:
    """A PrefixStore for the watchdog's keys (heartbeats, the abort notice, acks)."""
    default = dist.distributed_c10d._get_default_store()
    base = _underlying(default)
    if isinstance(base, dist.TCPStore):
        client = dist.TCPStore(
            base.host, base.port, is_master=False, timeout=timedelta(seconds=timeout_s),
            wait_for_workers=False,
        )  # fmt: skip
        return dist.PrefixStore(PREFIX, client)
    return dist.PrefixStore(PREFIX, default)


def try_get(store: Any, key: str) -> bytes | None:
    """The value of ``key``, or None when it is not set (never blocks on a missing key)."""
    if not store.check([key]):
        return None
    return bytes(store.get(key))
