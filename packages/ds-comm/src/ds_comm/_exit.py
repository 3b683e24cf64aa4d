"""Tear the default process group down at interpreter exit, for groups this package created.

A gloo rank whose process ends while a peer's gloo threads still read from its connections makes
that peer abort at exit ("terminate called without an active exception", status -6) after a
clean run, and scripts written for DeepSpeed rarely destroy the group they never created
themselves. So at exit the ranks that finished normally meet at a bounded barrier (a rank that
is still busy, e.g. writing a checkpoint alone, is waited for up to ``EXIT_BARRIER_S``) and then
destroy the group. A rank leaving with an uncaught exception skips the barrier: its peers are
not coming, and waiting would only delay the launcher noticing the failure.
"""

from __future__ import annotations

import atexit
import contextlib
import sys
from datetime import timedelta
from typing import Any

import torch.distributed as dist

#: how long a rank that finished waits at exit for the others before tearing down anyway
EXIT_BARRIER_S = 30.0


def teardown_at_exit() -> None:
    """Destroy the current default group when the interpreter exits, unless the script did it
    (or replaced the group) before; every rank of the group calls this after creating it."""
    atexit.register(_teardown, dist.group.WORLD, EXIT_BARRIER_S)


def _teardown(group: Any, barrier_s: float) -> None:
    if not (dist.is_available() and dist.is_initialized()) or dist.group.WORLD is not group:
        return
    failed = getattr(sys, "last_value", None) is not None  # set for an uncaught exception
    if not failed and dist.get_backend() == "gloo" and dist.get_world_size() > 1:
        # a peer that never arrives (or already left) raises here: tear down anyway
        with contextlib.suppress(Exception):
            dist.monitored_barrier(timeout=timedelta(seconds=barrier_s))
    # exiting anyway: a failed teardown must not replace the script's exit status
    with contextlib.suppress(Exception):
        dist.destroy_process_group()
