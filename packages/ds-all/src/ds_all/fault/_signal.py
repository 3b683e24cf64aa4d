"""Save on SIGTERM (preemption): the signal only sets a flag; the save happens at the next
optimizer-step boundary, at the same step on every rank, then the process exits 0.

Ranks receive the signal at slightly different moments (one may be a micro-step ahead), so the
flag is agreed on with one tiny all-reduce (MAX) at each boundary: a rank that got the signal
makes all of them save the same step. A second SIGTERM restores the default action (exit now).
"""

from __future__ import annotations

import atexit
import signal
import threading
import types


class SignalFlag:
    """Installs a SIGTERM handler (main thread only) that records the request."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
        self.requested: int | None = None
        self._previous: dict[int, object] = {}
        if threading.current_thread() is not threading.main_thread():
            return  # Python allows handlers only in the main thread; saving on signal is off
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handler)
        # Python's finalization puts SIG_DFL back; a SIGTERM landing after the training loop,
        # during teardown, would then kill a rank whose job is complete (status -15).
        atexit.register(self._ignore_during_teardown)

    def _ignore_during_teardown(self) -> None:
        if self._previous:
            for sig in self._previous:
                signal.signal(sig, signal.SIG_IGN)

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def _handler(self, signum: int, frame: types.FrameType | None) -> None:
        if self.requested is not None:
            # Asked twice: the user (or the launcher's grace period) wants us gone now.
            self.restore()
            signal.raise_signal(signum)
            return
        self.requested = signum

    def restore(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)  # type: ignore[arg-type]
        self._previous.clear()
