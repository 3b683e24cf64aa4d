"""The --rank_timeout watchdog: when does a running rank count as hung?

A rank shows progress in two ways. It may beat a heartbeat (touch the file named by
`DS_LAUNCH_HEARTBEAT_FILE`, which `ds_launcher.heartbeat()` does), and each beat restarts its
clock. And once any member of the group has finished successfully, every other member is on the
clock too: a finished peer means the job is ending, and a rank that neither exits nor beats
within the timeout is stuck (in a non-daemon thread, an atexit handler, a barrier its peers
left, a loop outside any collective). A rank that never beats is not judged while all of its
peers still run: without heartbeats, a long step and a hang look the same from outside.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

HEARTBEAT_ENV = "DS_LAUNCH_HEARTBEAT_FILE"


def heartbeat() -> None:
    """Tell ds-launch's --rank_timeout watchdog that this rank is making progress.

    Call it from a training loop (once per step is plenty). Without --rank_timeout (or outside
    ds-launch) the variable is unset and this does nothing; it costs one system call.
    """
    path = os.environ.get(HEARTBEAT_ENV)
    if not path:
        return
    try:
        os.utime(path)
    except FileNotFoundError:
        with open(path, "ab"):
            pass


@dataclass(frozen=True)
class Hang:
    index: int  # of the member in the group
    idle_s: float  # seconds since its last sign of progress
    since: str  # what started the clock, for the message


@dataclass
class _Clock:
    heartbeat: Path | None
    last_progress: float | None = None  # monotonic; None: not on the clock yet
    since: str = ""
    last_mtime: int | None = None


class ProgressWatchdog:
    """Tracks each member's last sign of progress; `poll` reports the first one idle too long."""

    def __init__(
        self,
        timeout: float,
        heartbeats: Sequence[Path | None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.timeout = timeout
        self._clock = clock
        self._members = [_Clock(hb) for hb in heartbeats]

    def member_exited(self, name: str, code: int) -> None:
        """A successful exit puts every member that is still running on the clock."""
        if code != 0:
            return  # a failure stops the group anyway
        now = self._clock()
        for member in self._members:
            if member.last_progress is None or member.last_progress < now:
                member.last_progress, member.since = now, f"{name} exited with code 0"

    def poll(self, alive: Sequence[int]) -> Hang | None:
        now = self._clock()
        for index in alive:
            member = self._members[index]
            if member.heartbeat is not None:
                try:
                    mtime = member.heartbeat.stat().st_mtime_ns
                except FileNotFoundError:
                    mtime = None  # no beat yet
                if mtime is not None and mtime != member.last_mtime:
                    # The observation time, not the mtime: file times are wall-clock and may
                    # come from a filesystem clock that differs from this one.
                    member.last_mtime = mtime
                    member.last_progress, member.since = now, "its last heartbeat"
            if member.last_progress is not None and now - member.last_progress > self.timeout:
                return Hang(index, now - member.last_progress, member.since)
        return None
