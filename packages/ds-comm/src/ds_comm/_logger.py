"""The comms logger: per-operation counts, bytes, latency, algbw and busbw.

Every collective of ``ds_comm`` reports to one :class:`CommsLogger`. When the logger is off the
collective does a single attribute read and calls ``torch.distributed`` directly, so the cost of
having the layer is one Python branch (see ``benchmarks/comm/logger_overhead.py``). When it is on,
each call is timed (with a device synchronize before and after on accelerators, so queued kernels
are not billed to the collective) and aggregated per (log name, message size).

Message size and bandwidth follow nccl-tests (``doc/PERFORMANCE.md`` there):

* ``size`` is the bytes of the full buffer: the tensor for all-reduce/broadcast/reduce/send, the
  gathered output for all-gather, the un-scattered input for reduce-scatter and all-to-all;
* ``algbw = size / time``;
* ``busbw = algbw * factor`` with factor ``2(n-1)/n`` (all-reduce), ``(n-1)/n`` (all-gather,
  reduce-scatter, all-to-all, gather, scatter), ``1`` (broadcast, reduce, send/recv).

``size * factor`` is also what a rank puts on the wire with the bandwidth-optimal (ring) algorithm,
which is what :attr:`OpStats.wire_bytes` reports.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch


class OpKind(enum.Enum):
    """The collective families that differ in their bus-bandwidth factor."""

    ALL_REDUCE = "all_reduce"
    ALL_GATHER = "all_gather"
    REDUCE_SCATTER = "reduce_scatter"
    ALL_TO_ALL = "all_to_all"
    BROADCAST = "broadcast"
    REDUCE = "reduce"
    GATHER = "gather"
    SCATTER = "scatter"
    SEND = "send"
    RECV = "recv"
    BARRIER = "barrier"


def busbw_factor(kind: OpKind, world_size: int) -> float:
    """nccl-tests' ratio busbw/algbw for ``kind`` over ``world_size`` ranks."""
    n = world_size
    if kind is OpKind.ALL_REDUCE:
        return 2.0 * (n - 1) / n
    if kind in (
        OpKind.ALL_GATHER,
        OpKind.REDUCE_SCATTER,
        OpKind.ALL_TO_ALL,
        OpKind.GATHER,
        OpKind.SCATTER,
    ):
        return (n - 1) / n
    if kind is OpKind.BARRIER:
        return 0.0
    return 1.0  # broadcast, reduce, send, recv


@dataclass
class OpStats:
    """Aggregate of every call of one log name with one message size."""

    name: str
    kind: OpKind
    msg_bytes: int
    world_size: int
    count: int = 0
    total_latency_s: float = 0.0
    #: per-call latencies, kept so that the summary can show spread; bounded by ``max_samples``
    latencies_s: list[float] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return self.msg_bytes * self.count

    @property
    def wire_bytes(self) -> int:
        """Bytes this rank sent over all calls under the ring-algorithm model (size * factor)."""
        return round(self.msg_bytes * busbw_factor(self.kind, self.world_size)) * self.count

    @property
    def avg_latency_s(self) -> float:
        return self.total_latency_s / self.count if self.count else 0.0

    @property
    def algbw(self) -> float:
        """Bytes per second: total size over total time (a time-weighted mean)."""
        return self.total_bytes / self.total_latency_s if self.total_latency_s > 0 else 0.0

    @property
    def busbw(self) -> float:
        return self.algbw * busbw_factor(self.kind, self.world_size)


class _TimedWork:
    """Async handle that records the op's latency (launch to completed ``wait``) once."""

    __slots__ = ("_work", "_finish", "_done")

    def __init__(self, work: Any, finish: Callable[[], None]) -> None:
        self._work = work
        self._finish = finish
        self._done = False

    def wait(self, timeout: Any = None) -> bool:
        result = self._work.wait() if timeout is None else self._work.wait(timeout)
        if not self._done:
            self._done = True
            self._finish()
        return result if result is not None else True

    def is_completed(self) -> bool:
        return self._work.is_completed()

    def __getattr__(self, name: str) -> Any:  # get_future, exception, ...
        return getattr(self._work, name)


class CommsLogger:
    """Records every collective that goes through ``ds_comm``.

    ``enabled`` is a plain attribute read by every collective (no property, to keep the off path
    cheap). ``prof_ops`` restricts recording to those log names; ``verbose`` prints one line per
    call. Use :func:`get_comms_logger` for the shared default or pass ``logger=`` to a collective.
    """

    def __init__(
        self,
        enabled: bool = False,
        *,
        verbose: bool = False,
        prof_ops: Iterable[str] | None = None,
        max_samples: int = 10_000,
        print_fn: Callable[[str], None] = print,
    ) -> None:
        self.enabled: bool = enabled
        self.verbose: bool = verbose
        self.prof_ops: frozenset[str] | None = frozenset(prof_ops) if prof_ops else None
        self.max_samples: int = max_samples
        self.print_fn: Callable[[str], None] = print_fn
        self._stats: dict[tuple[str, int], OpStats] = {}

    # ------------------------------------------------------------------ control
    def enable(self) -> None:
        self.enabled = True

    def disable(self) -> None:
        self.enabled = False

    def reset(self) -> None:
        self._stats.clear()

    # ------------------------------------------------------------------ recording
    def record(
        self, name: str, kind: OpKind, msg_bytes: int, latency_s: float, world_size: int
    ) -> None:
        """Add one completed call. Public so that non-torch transports (mpi4py) can report."""
        if self.prof_ops is not None and name not in self.prof_ops:
            return
        key = (name, msg_bytes)
        st = self._stats.get(key)
        if st is None:
            st = self._stats[key] = OpStats(name, kind, msg_bytes, world_size)
        st.count += 1
        st.total_latency_s += latency_s
        if len(st.latencies_s) < self.max_samples:
            st.latencies_s.append(latency_s)
        if self.verbose:
            algbw = msg_bytes / latency_s if latency_s > 0 else 0.0
            self.print_fn(
                f"[ds_comm] {name}: size={_fmt_bytes(msg_bytes)} latency={latency_s * 1e3:.3f} ms "
                f"algbw={algbw / 1e9:.3f} GB/s "
                f"busbw={algbw * busbw_factor(kind, world_size) / 1e9:.3f} GB/s"
            )

    def run(
        self,
        name: str,
        kind: OpKind,
        msg_bytes: int,
        world_size: int,
        device: torch.device,
        launch: Callable[[], Any],
        async_op: bool,
    ) -> Any:
        """Time ``launch()`` (a torch.distributed call) and record it; returns its result."""
        sync = device.type != "cpu"
        if sync:
            _synchronize()
        t0 = time.perf_counter()
        work = launch()
        if async_op and work is not None:

            def finish() -> None:
                if sync:
                    _synchronize()
                self.record(name, kind, msg_bytes, time.perf_counter() - t0, world_size)

            return _TimedWork(work, finish)
        if sync:
            _synchronize()
        self.record(name, kind, msg_bytes, time.perf_counter() - t0, world_size)
        return work

    # ------------------------------------------------------------------ reading
    def stats(self) -> list[OpStats]:
        """Aggregates sorted by name then message size."""
        return sorted(self._stats.values(), key=lambda s: (s.name, s.msg_bytes))

    def get(self, name: str) -> list[OpStats]:
        return [s for s in self.stats() if s.name == name]

    def total_bytes(self, name: str | None = None) -> int:
        return sum(s.total_bytes for s in self._stats.values() if name is None or s.name == name)

    def wire_bytes(self, name: str | None = None) -> int:
        return sum(s.wire_bytes for s in self._stats.values() if name is None or s.name == name)

    def summary_table(self) -> str:
        header = (
            f"{'op':<32}{'size':>12}{'count':>8}{'total lat (ms)':>16}{'avg lat (ms)':>14}"
            f"{'algbw (GB/s)':>14}{'busbw (GB/s)':>14}"
        )
        lines = [header, "-" * len(header)]
        for s in self.stats():
            lines.append(
                f"{s.name:<32}{_fmt_bytes(s.msg_bytes):>12}{s.count:>8}"
                f"{s.total_latency_s * 1e3:>16.3f}{s.avg_latency_s * 1e3:>14.3f}"
                f"{s.algbw / 1e9:>14.3f}{s.busbw / 1e9:>14.3f}"
            )
        return "\n".join(lines)

    def log_summary(self, print_fn: Callable[[str], None] | None = None) -> str:
        """Print the table (through ``print_fn``, default the logger's) and return it."""
        table = self.summary_table()
        (print_fn or self.print_fn)(table)
        return table


def _synchronize() -> None:
    # Imported lazily: CPU-only runs never need the accelerator for timing.
    from ds_accel import get_accelerator

    get_accelerator().synchronize()


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


# One cached default, replaceable by tests and applications (no other global state).
_default_logger: CommsLogger = CommsLogger(enabled=False)


def get_comms_logger() -> CommsLogger:
    """The logger collectives use when no ``logger=`` is passed."""
    return _default_logger


def set_comms_logger(logger: CommsLogger) -> CommsLogger:
    """Replace the default logger; returns the previous one so callers can restore it."""
    global _default_logger
    if not isinstance(logger, CommsLogger):
        raise TypeError(f"set_comms_logger expects a CommsLogger, got {type(logger).__name__}")
    previous, _default_logger = _default_logger, logger
    return previous
