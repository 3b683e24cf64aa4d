"""Errors of ds_offload; each message names the path, key or tensor and the fix."""

from __future__ import annotations


class AioError(OSError):
    """A read or write of the async IO engine failed (errno and path in the message)."""


class NvmePathError(ValueError):
    """An ``nvme_path`` that does not exist, is not a writable directory or has too little
    free space for the swap files it must hold."""


class OffloadWarning(UserWarning):
    """A request was served in a degraded way (e.g. pinned memory beyond the lockable limit
    fell back to pageable memory); training continues, more slowly."""
