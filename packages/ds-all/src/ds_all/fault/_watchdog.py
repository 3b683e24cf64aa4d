"""The stall watchdog: turns "the job hangs" into "every rank exits non-zero, naming the rank
that stalled and the collective".

Each rank runs one daemon thread that, every ``interval`` seconds, publishes a heartbeat to the
rendezvous store: its collective sequence number per process group (torch's counter of
collectives issued, so a rank that never entered collective #n shows n-1), its step, where its
training thread is (stack summary) and, under ZeRO-3, its module call counts of the step.

* When a collective fails (gloo's or NCCL's timeout raises in the training thread), the
  uncaught-exception hook reads every rank's heartbeat and prints the diagnosis: which ranks
  never entered the collective (and where they are), which stopped beating (dead or frozen),
  and which collective the others waited in. It posts the diagnosis as an abort notice.
* Every rank's thread polls the abort notice and exits (status 1) when it appears, so a rank
  stuck outside any collective (a hung data loader, a sleep, a divergent branch) stops too,
  with or without a launcher.
* Backstop for backends whose timeout does not raise: a training thread stuck in the same
  collective for ``timeout + grace`` seconds gets the same diagnosis and exit.
* ZeRO-3 control flow: when every rank has been stuck in a collective for a few seconds and
  their module call counts differ, that is a deadlock by construction: it is reported at once,
  naming the module, without waiting for the timeout.

The thread never touches the process group (only the store), so it cannot add a collective
that the ranks would have to agree on.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import sys
import threading
import time
import types
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from ds_all.fault._control_flow import CallCounter, explain_divergence
from ds_all.fault._stack import collective_from_traceback, thread_where
from ds_all.fault._store import try_get

EXIT_STALLED = 1  # exit status of a rank stopped by the watchdog


def _seq(group: Any) -> int:
    try:
        return int(group._get_sequence_number_for_group())
    except (AttributeError, RuntimeError):
        return -1


def _is_collective_error(exc: BaseException, tb: types.TracebackType | None) -> bool:
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc)
    if any(s in text for s in ("gloo", "Gloo", "NCCL", "Timed out", "timed out", "pair closure")):
        return True
    return "torch.distributed" in collective_from_traceback(tb)


class Watchdog:
    """One per rank; :meth:`start` after the process group exists, :meth:`stop` at close."""

    def __init__(
        self,
        store: Any,
        rank: int,
        world_size: int,
        groups: dict[str, Any],
        timeout_s: float,
        interval_s: float,
        progress: Callable[[], dict[str, int]],
        flow: CallCounter | None = None,
        out: Any = None,
        exit_fn: Callable[[int], None] = os._exit,
    ) -> None:
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.groups = groups
        self.timeout_s = timeout_s
        self.interval_s = interval_s
        self.progress = progress
        self.flow = flow
        self.out = out or sys.stderr
        self.exit_fn = exit_fn
        #: ZeRO-3 deadlocks are declared after every rank has been stuck this long
        self.flow_after_s = min(5.0, timeout_s / 2)
        #: backstop: stuck this long past the timeout without the backend raising
        self.backstop_s = timeout_s + min(15.0, max(5.0, timeout_s / 4))
        self._thread_id = threading.get_ident()  # the training thread: the one that builds us
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_seq: dict[str, int] = {}
        self._seq_since = time.monotonic()
        self._warned_seq: dict[str, int] | None = None
        self._aborting = threading.Lock()
        self._prev_hook: Callable[..., Any] | None = None
        self._store_errors = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._beat()
        self._thread = threading.Thread(target=self._run, name="ds_all-watchdog", daemon=True)
        self._thread.start()
        self._prev_hook = sys.excepthook
        sys.excepthook = self._excepthook
        # A script that never calls engine.close() (DeepSpeed's examples don't) would leave the
        # thread running into interpreter finalization. There a daemon thread coming back from a
        # store call (C++, GIL released) is ended with pthread_exit, whose unwinding through
        # pybind11's frames aborts the process ("terminate called without an active
        # exception", status 134) after training succeeded. atexit runs before that.
        atexit.register(self.stop)

    def stop(self) -> None:
        atexit.unregister(self.stop)
        self._stop.set()
        if self._thread is not None:
            # long enough for a store call in flight to time out (open_store's timeout <= 10 s)
            self._thread.join(timeout=2 * self.interval_s + 11)
            self._thread = None
        if self._prev_hook is not None and sys.excepthook == self._excepthook:
            sys.excepthook = self._prev_hook
        self._prev_hook = None

    # ------------------------------------------------------------------ heartbeat
    def seqs(self) -> dict[str, int]:
        return {name: _seq(g) for name, g in self.groups.items()}

    def _beat(self) -> dict[str, Any]:
        now = time.monotonic()
        seq = self.seqs()
        if seq != self._last_seq:
            self._last_seq, self._seq_since = seq, now
        where = thread_where(self._thread_id)
        hb = {
            "rank": self.rank, "pid": os.getpid(), "host": socket.gethostname(),
            "t": time.time(), "seq": seq, "stuck_s": now - self._seq_since,
            "in_collective": where.in_collective, "where": where.describe(),
            "progress": self.progress(),
            "flow": self.flow.snapshot() if self.flow is not None else None,
        }  # fmt: skip
        self.store.set(f"hb/{self.rank}", json.dumps(hb))
        return hb

    def heartbeats(self) -> dict[int, dict[str, Any]]:
        found = {}
        for r in range(self.world_size):
            with contextlib.suppress(Exception):
                raw = try_get(self.store, f"hb/{r}")
                if raw is not None:
                    found[r] = json.loads(raw)
        return found

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                hb = self._beat()
                self._check_abort()
                self._check_stuck(hb)
            except Exception as exc:  # noqa: BLE001 - the store's host may be gone; keep going
                if not self._store_errors and not self._aborting.locked():
                    first = (str(exc).splitlines() or [type(exc).__name__])[0]
                    self._print(f"watchdog: store unreachable ({first[:200]}); will retry")
                self._store_errors += 1

    # ------------------------------------------------------------------ decisions
    def _check_abort(self) -> None:
        raw = try_get(self.store, "abort")
        if raw is None:
            return
        notice = json.loads(raw)
        if notice.get("by") == self.rank:
            return
        self._print(
            f"stopping: rank {notice.get('by')} reported a failure of the job:\n"
            + notice.get("message", "")
        )
        self._ack()
        self._exit(EXIT_STALLED)

    def _check_stuck(self, hb: dict[str, Any]) -> None:
        if not hb["in_collective"]:
            return
        stuck = hb["stuck_s"]
        if self.flow is not None and stuck >= self.flow_after_s:
            others = self.heartbeats()
            fresh = [
                o for o in others.values()
                if time.time() - o["t"] < 3 * self.interval_s + 2
                and o["in_collective"] and o["stuck_s"] >= self.flow_after_s
            ]  # fmt: skip
            if len(fresh) == self.world_size:
                why = explain_divergence({o["rank"]: o["flow"] or {} for o in fresh})
                if why is not None:
                    self.fail(f"ZeRO-3 deadlock: {why}", what="a parameter all-gather")
        if stuck >= self.backstop_s:
            self.fail(
                f"no progress for {stuck:.0f} s in a collective (timeout {self.timeout_s:g} s) "
                "and the backend did not raise",
                what=hb["where"],
            )
        if stuck >= self.timeout_s / 2 and self._warned_seq != hb["seq"]:
            self._warned_seq = hb["seq"]
            self._print(
                f"warning: waiting {stuck:.0f} s in a collective (timeout {self.timeout_s:g} s)\n"
                + self.diagnose(hb["where"])
            )

    # ------------------------------------------------------------------ diagnosis
    def diagnose(self, what: str, reason: str | None = None) -> str:
        """The report: which rank(s) stalled, where they are, which collective the others wait in."""
        mine = self.seqs()
        hbs = self.heartbeats()
        stale_after = max(3 * self.interval_s + 2, 5.0)
        seq_txt = ", ".join(f"#{n} of the {g} group" for g, n in mine.items())
        lines = [f"rank {self.rank} is in collective {seq_txt}: {what}"]
        if reason:
            lines.insert(0, reason)
        stalled, waiting = [], [self.rank]
        for r in range(self.world_size):
            if r == self.rank:
                continue
            hb = hbs.get(r)
            if hb is None:
                stalled.append(f"rank {r} never sent a heartbeat (did not start, or no store)")
                continue
            age = time.time() - hb["t"]
            at = f"step {hb['progress'].get('step')}, {hb['where']}"
            behind = [g for g, n in mine.items() if hb["seq"].get(g, n) < n]
            if age > stale_after:
                stalled.append(
                    f"rank {r} (pid {hb['pid']} on {hb['host']}) stopped responding {age:.0f} s "
                    f"ago (dead or frozen); it was at {at}"
                )
            elif behind:
                last = ", ".join(f"#{hb['seq'][g]}" for g in behind)
                state = "waiting in another collective at" if hb["in_collective"] else "running"
                stalled.append(
                    f"rank {r} (pid {hb['pid']} on {hb['host']}) never entered it (its last "
                    f"collective is {last}); it is alive, {state} {at}"
                )
            else:
                waiting.append(r)
        flows = {r: hb["flow"] for r, hb in hbs.items() if hb.get("flow") is not None}
        why = explain_divergence(flows) if len(flows) == self.world_size else None
        head = []
        if stalled:
            names = ", ".join(s.split(" ")[1] for s in stalled)
            head.append(f"stalled rank(s): {names}")
        if why and not (reason and why in reason):
            head.append(why)
        lines = head + lines
        lines += [f"stalled: {s}" for s in stalled]
        lines.append(f"waiting in the collective: rank(s) {', '.join(map(str, sorted(waiting)))}")
        return "\n".join(lines)

    def fail(self, reason: str, what: str) -> None:
        """Print the diagnosis, post it as the abort notice, wait briefly for the others to
        read it (the store may live in this process), and exit."""
        if not self._aborting.acquire(blocking=False):
            return
        message = self.diagnose(what, reason)
        self._print(message)
        self._post_abort(message)
        self._exit(EXIT_STALLED)

    def _post_abort(self, message: str) -> None:
        with contextlib.suppress(Exception):
            notice = json.dumps({"by": self.rank, "message": message})
            self.store.compare_set("abort", "", notice)
            deadline = time.monotonic() + min(5.0, 2 * self.interval_s + 2)
            while time.monotonic() < deadline:
                acks = sum(
                    1 for r in range(self.world_size) if r != self.rank
                    and self.store.check([f"ack/{r}"])
                )  # fmt: skip
                if acks >= self.world_size - 1:
                    break
                time.sleep(0.1)

    def _ack(self) -> None:
        with contextlib.suppress(Exception):
            self.store.set(f"ack/{self.rank}", "1")

    def _excepthook(self, tp: type[BaseException], val: BaseException, tb: Any) -> None:
        prev = self._prev_hook or sys.__excepthook__
        prev(tp, val, tb)
        if not _is_collective_error(val, tb) or not self._aborting.acquire(blocking=False):
            return
        with contextlib.suppress(Exception):
            raw = try_get(self.store, "abort")
            if raw is not None:  # another rank diagnosed first: repeat its finding
                self._print("the job failed; diagnosis by rank "
                            f"{json.loads(raw)['by']}:\n{json.loads(raw)['message']}")  # fmt: skip
                self._ack()
                return
            first = str(val).splitlines()[0] if str(val) else type(val).__name__
            message = self.diagnose(
                collective_from_traceback(tb), f"collective failed on rank {self.rank}: {first}"
            )
            self._print(message)
            self._post_abort(message)

    # ------------------------------------------------------------------ output
    def _print(self, text: str) -> None:
        prefix = f"[ds_all] rank {self.rank}: "
        body = "\n".join(prefix + line for line in text.splitlines())
        with contextlib.suppress(Exception):
            print(body, file=self.out, flush=True)

    def _exit(self, code: int) -> None:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        self.exit_fn(code)


def groups_of(dp_group: Any) -> dict[str, Any]:
    """The process groups whose sequence numbers a heartbeat reports."""
    groups = {"default": dist.distributed_c10d._get_default_group()}
    if dp_group is not None and dp_group is not groups["default"]:
        groups["data-parallel"] = dp_group
    return groups
