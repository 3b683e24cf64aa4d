"""Tear the default process group down at interpreter exit, for groups this package created.

A gloo rank whose process ends while a peer's gloo threads still read from its connections makes
that peer abort at exit ("terminate called without an active exception", status -6) after a
clean run, and scripts written for DeepSpeed rarely destroy the group they never created
themselves. So at exit the ranks that finished normally meet at a bounded barrier (a rank that
is still busy, e.g. writing a checkpoint alone, is waited for up to ``EXIT_BARRIER_S``) and then
destroy the group. A rank leaving with an uncaught exception skips the barrier: its peers are
not coming, and waiting would only delay the launcher noticing the failure.

Destroying the group only stops gloo's threads if the ProcessGroup object dies with it: torch
joins its worker threads in the C++ destructor, run when the last Python reference goes.
While a reference outlives ``destroy_process_group`` the threads run on into interpreter
finalization, and a worker that drops a finished work holding tensors there (the last barrier
keeps the collectives before it alive) needs the GIL, and ``pthread_exit`` from a noexcept
destructor aborts the process ("terminate called without an active exception", -6, seen on a
loaded 2-core CI run of ds-zero's README example). So :func:`release_world_refs` drops the
references torch itself keeps, and the exit hook holds the group only weakly.
"""

from __future__ import annotations

import atexit
import contextlib
import sys
import types
import weakref
from datetime import timedelta
from typing import Any

import torch.distributed as dist

#: how long a rank that finished waits at exit for the others before tearing down anyway
EXIT_BARRIER_S = 30.0


def teardown_at_exit() -> None:
    """Destroy the current default group when the interpreter exits, unless the script did it
    (or replaced the group) before; every rank of the group calls this after creating it."""
    # weakly: a strong reference here would keep the group (and its threads) alive past a
    # destroy_process_group() of the script until the exit hooks run
    atexit.register(_teardown, weakref.ref(dist.group.WORLD), EXIT_BARRIER_S)


def release_world_refs() -> None:
    """Drop the references torch's own modules keep to the current default group, so that
    destroying it really ends its threads (see the module docstring).

    ``torch.distributed.nn.functional`` (imported lazily, e.g. by the first optimizer through
    ``torch._dynamo``) has ``group=group.WORLD`` defaults evaluated at import: imported after
    init, its functions hold the default group for good. Such defaults become ``None``, which
    torch reads as the default group, the one they meant; nothing else is changed."""
    world = dist.group.WORLD
    if world is None:
        return
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("torch.distributed"):
            continue
        for obj in list(vars(module).values()):
            # type(), not isinstance(): some module attributes warn when their class is read
            fns = list(vars(obj).values()) if issubclass(type(obj), type) else [obj]
            for fn in fns:
                defaults = fn.__defaults__ if type(fn) is types.FunctionType else None
                if defaults and any(d is world for d in defaults):
                    fn.__defaults__ = tuple(None if d is world else d for d in defaults)


def _teardown(group_ref: weakref.ref[Any], barrier_s: float) -> None:
    group = group_ref()
    if not (dist.is_available() and dist.is_initialized()) or dist.group.WORLD is not group:
        return
    failed = getattr(sys, "last_value", None) is not None  # set for an uncaught exception
    if not failed and dist.get_backend() == "gloo" and dist.get_world_size() > 1:
        # a peer that never arrives (or already left) raises here: tear down anyway
        with contextlib.suppress(Exception):
            dist.monitored_barrier(timeout=timedelta(seconds=barrier_s))
    del group  # ours must not be the reference that keeps it alive either
    # exiting anyway: a failed teardown must not replace the script's exit status
    with contextlib.suppress(Exception):
        release_world_refs()
        dist.destroy_process_group()
