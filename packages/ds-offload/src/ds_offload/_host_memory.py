"""How much host memory is free: sizes the gradient buffers of ``OffloadStepper``."""

from __future__ import annotations

import os


def host_available_bytes() -> int | None:
    """The kernel's estimate of memory available to new allocations without swapping
    (``MemAvailable``), or None where it cannot be read (not Linux)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None
