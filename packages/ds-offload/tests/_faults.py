"""Failure injection shared by the error tests (no small filesystem needed)."""

from __future__ import annotations

import errno
import os

from ds_offload import _nvme


def disk_full_after(monkeypatch, reservations: int) -> list[int]:
    """Make posix_fallocate in ds_offload's swap-file code fail with ENOSPC after
    ``reservations`` successful calls; returns the list of requested sizes, filled as it runs."""
    real = os.posix_fallocate
    calls: list[int] = []

    def fallocate(fd: int, off: int, size: int) -> None:
        calls.append(size)
        if len(calls) > reservations:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, off, size)

    monkeypatch.setattr(_nvme.os, "posix_fallocate", fallocate)
    return calls
