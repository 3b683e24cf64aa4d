"""The thread that runs the CPU side of an optimizer step while the caller goes on.

One persistent thread per stepper: OpenMP keeps one pool of worker threads per calling thread,
so a thread made per step would build a new pool of CPU-Adam threads every step. The CPU Adam
kernel is called through ctypes, which releases the GIL, so Python on the main thread (the next
forward's kernel launches) keeps running while the update runs.

``UpdateJob`` is what the caller waits on: one ``threading.Event`` per partition, set once the
partition's new values are in place (written into a host shard, or their host-to-device copy
queued with a device event that the waiter's stream waits on), and one for the whole job. An
exception in the job is kept and raised in the thread that waits next.

At interpreter exit the thread finishes the jobs already queued before the process goes on to
finalize (an ``atexit`` hook joins it). A script may end right after ``engine.step()`` while that
step's update is still running on this thread; left alone, the daemon thread would be stopped
inside the CPU kernel (its last update half written) and, coming back to Python during
finalization, abort the process with "terminate called without an active exception".
"""

from __future__ import annotations

import atexit
import enum
import queue
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any


class JobState(enum.Enum):
    """Where an update job is."""

    QUEUED = "queued"  # submitted, the thread has not started it
    RUNNING = "running"  # the thread is updating partitions; some events may be set
    DONE = "done"  # every partition published (or the job failed: ``error`` is set)


class UpdateJob:
    """The progress of one step's CPU-side work, shared by the worker and the waiters."""

    def __init__(self, indices: Iterable[int]) -> None:
        self.published: dict[int, threading.Event] = {i: threading.Event() for i in indices}
        # device event after a partition's host-to-device copy (absent: nothing to wait for)
        self.device_events: dict[int, Any] = {}
        self.finished = threading.Event()
        self.state = JobState.QUEUED
        self.error: BaseException | None = None
        self._lock = threading.Lock()  # expect() against close(): no event left unset

    def expect(self, index: int) -> None:
        """Caller side, for a job that learns its partitions as it runs (gradients streamed
        during backward): partition ``index`` will be published."""
        with self._lock:
            event = threading.Event()
            if self.state is JobState.DONE:
                event.set()  # the job ended (failed): waiters must not hang
            self.published[index] = event

    def close(self, error: BaseException | None) -> None:
        """Worker side: the job is over; every waiter wakes up (and sees ``error``)."""
        with self._lock:
            self.error = error
            for event in self.published.values():
                event.set()
            self.state = JobState.DONE
        self.finished.set()

    def publish(self, index: int, device_event: Any = None) -> None:
        """Worker side: partition ``index``'s new values are where readers look for them."""
        if device_event is not None:
            self.device_events[index] = device_event
        event = self.published.get(index)
        if event is not None:
            event.set()

    def is_published(self, index: int) -> bool:
        event = self.published.get(index)
        return event is None or event.is_set()

    def wait(self, index: int) -> Any:
        """Block until partition ``index`` is published; returns its device event (or None)."""
        event = self.published.get(index)
        if event is not None:
            event.wait()
        self._raise()
        return self.device_events.get(index)

    def wait_all(self) -> None:
        self.finished.wait()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise RuntimeError(
                "the offloaded optimizer step failed on its worker thread (see the cause above); "
                "the parameters of this step are partly updated"
            ) from self.error


class UpdateWorker:
    """A daemon thread running submitted jobs one after another."""

    def __init__(self, name: str, on_start: Callable[[], None] | None = None) -> None:
        self._queue: queue.SimpleQueue[tuple[UpdateJob, Callable[[], None]] | None] = (
            queue.SimpleQueue()
        )
        self._on_start = on_start
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        # a weak reference: the hook must not keep an abandoned worker alive until exit
        self._at_exit = _drain_at_exit(weakref.ref(self))
        atexit.register(self._at_exit)

    def submit(self, job: UpdateJob, body: Callable[[], None]) -> UpdateJob:
        self._queue.put((job, body))
        return job

    def _run(self) -> None:
        if self._on_start is not None:
            self._on_start()
        while True:
            item = self._queue.get()
            if item is None:
                return
            job, body = item
            job.state = JobState.RUNNING
            error = None
            try:
                body()
            except BaseException as exc:  # raised again in the waiting thread
                error = exc
            job.close(error)

    def stop(self) -> None:
        """Let the thread end after the jobs queued so far (no wait): for a stepper that is
        garbage-collected without ``close``."""
        self._queue.put(None)

    def close(self) -> None:
        """Run the jobs queued so far, then end the thread (blocks until it has ended)."""
        atexit.unregister(self._at_exit)
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


def _drain_at_exit(ref: weakref.ref[UpdateWorker]) -> Callable[[], None]:
    def drain() -> None:
        worker = ref()
        if worker is not None:
            worker.close()

    return drain
