"""Run a group of processes that live and die together (fail-fast).

Used for the ranks of one node (local runner, per-node agent, MPI shim) and for the per-node
ssh connections of the ssh runner. Each member starts in its own session, so a stop reaches the
member's whole process tree (data-loader workers included) through its process group, and a
Ctrl-C on the launcher's terminal reaches members only through the launcher, in one order.
"""

from __future__ import annotations

import contextlib
import enum
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, BinaryIO

from ds_launcher._watchdog import ProgressWatchdog

# Exit code when --rank_timeout finds a hung rank: the convention of coreutils' `timeout`.
HANG_EXIT_CODE = 124


class GracefulStop(enum.Enum):
    """How a member is first asked to stop, before SIGKILL."""

    SIGTERM = "sigterm"  # a rank: SIGTERM to its process group
    CLOSE_STDIN = "close_stdin"  # an ssh connection: EOF on the agent's stdin stops the node


class StdinMode(enum.Enum):
    INHERIT = "inherit"  # local ranks keep the terminal (pdb in a rank works)
    DEVNULL = "devnull"  # ranks under an agent must not read the agent's control channel
    PIPE = "pipe"  # ssh connections: the launcher holds the write end and closes it to stop


@dataclass
class Member:
    name: str  # for messages: "rank 3", "node 1 (worker-2)"
    argv: list[str]
    env: dict[str, str]
    prefix: bytes | None = None  # prepended to every output line; None: output passes through
    log_path: Path | None = None  # every output line is also appended here (unprefixed)
    stdin: StdinMode = StdinMode.INHERIT
    graceful: GracefulStop = GracefulStop.SIGTERM
    host: str | None = None  # where a rank runs, for messages (node members name it already)
    heartbeat: Path | None = None  # the file the member touches to show progress


class Outcome(enum.Enum):
    SUCCEEDED = "succeeded"  # every member exited 0
    MEMBER_FAILED = "member_failed"  # a member exited non-zero; the others were stopped
    STOPPED = "stopped"  # a stop was requested (signal to the launcher, lost ssh connection)
    HUNG = "hung"  # a member made no progress within the rank timeout; all were stopped


@dataclass
class GroupResult:
    outcome: Outcome
    exit_code: int
    failed: str | None = None  # name of the first member that failed


class StopRequest:
    """Set by a signal handler or a watcher thread to stop a running group."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signum: int | None = None
        self.reason: str = ""

    def request(self, reason: str, signum: int | None = None) -> None:
        if not self._event.is_set():
            self.signum, self.reason = signum, reason
            self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


def exit_code_of(returncode: int) -> int:
    """Shell convention: a member killed by signal N makes the launcher exit 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


@dataclass
class _Running:
    member: Member
    proc: subprocess.Popen[bytes]
    pumps: list[threading.Thread] = field(default_factory=list)
    log: BinaryIO | None = None
    exited: bool = False


class _Output:
    """Serialises prefixed lines from many pump threads onto one stream."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self.lock:
            try:
                self.stream.write(data)
                self.stream.flush()
            except (OSError, ValueError):
                pass  # a closed terminal must not kill the supervisor


def _pump(pipe: IO[bytes], prefix: bytes, sink: _Output | None, log: BinaryIO | None) -> None:
    with pipe:
        for line in iter(pipe.readline, b""):
            if not line.endswith(b"\n"):
                line += b"\n"
            if sink is not None:
                sink.write(prefix + line)
            if log is not None:
                try:
                    log.write(line)
                    log.flush()
                except (OSError, ValueError):
                    pass


def _descendants(pid: int) -> list[int]:
    """Every live descendant of `pid`, from /proc (empty where /proc is unavailable).

    Needed because some members start children in sessions of their own (pdsh runs each ssh
    in a new session), out of reach of the member's process group.
    """
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name (field 2) may contain spaces and ')'; fields after the last ')'.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 1 and fields[0] != b"Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal_tree(run: _Running, sig: int) -> None:
    """Signal the member's process group and every descendant's group (collected first: once
    the member dies its children are re-parented and can no longer be found)."""
    groups = {run.proc.pid}
    for pid in _descendants(run.proc.pid):
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(pid))
    for group in groups:
        # Never our own group: a member that shares it (not started by us) must not take us down.
        if group == os.getpgrp():
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, sig)


def _start(member: Member, out: _Output, err: _Output) -> _Running:
    capture = member.prefix is not None or member.log_path is not None
    stdin = {
        StdinMode.INHERIT: None,
        StdinMode.DEVNULL: subprocess.DEVNULL,
        StdinMode.PIPE: subprocess.PIPE,
    }[member.stdin]
    log = None
    if member.log_path is not None:
        member.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(member.log_path, "ab")  # noqa: SIM115 - closed when the group ends
    proc = subprocess.Popen(
        member.argv,
        env=member.env,
        stdin=stdin,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.PIPE if capture else None,
        start_new_session=True,
    )
    run = _Running(member, proc, log=log)
    if capture:
        prefix = member.prefix or b""
        for pipe, sink in ((proc.stdout, out), (proc.stderr, err)):
            t = threading.Thread(target=_pump, args=(pipe, prefix, sink, log), daemon=True)
            t.start()
            run.pumps.append(t)
    return run


def run_group(
    members: list[Member],
    *,
    term_timeout: float = 5.0,
    rank_timeout: float | None = None,
    timeout_source: str = "--rank_timeout",
    stop: StopRequest | None = None,
    stdout: IO[bytes] | None = None,
    stderr: IO[bytes] | None = None,
) -> GroupResult:
    """Start all members; return when all exit 0, one fails, one hangs, or `stop` is requested.

    On failure, hang or stop, the remaining members get their graceful stop, then SIGKILL after
    `term_timeout` seconds; the result's exit code is the failed member's (128+N for signal N),
    HANG_EXIT_CODE for a hang (see `_watchdog`: no progress for `rank_timeout` seconds), or
    128+signum for a stop caused by a signal. `timeout_source` says in the hang message where
    the limit comes from.
    """
    stop = stop or StopRequest()
    watchdog = (
        ProgressWatchdog(rank_timeout, [m.heartbeat for m in members])
        if rank_timeout is not None
        else None
    )
    next_check = 0.0
    out = _Output(stdout or sys.stdout.buffer)
    err = _Output(stderr or sys.stderr.buffer)
    exits: queue.Queue[tuple[int, int]] = queue.Queue()
    running: list[_Running] = []
    result: GroupResult | None = None
    try:
        for member in members:
            if stop.is_set():
                break
            run = _start(member, out, err)
            running.append(run)
            index = len(running) - 1
            threading.Thread(
                target=lambda i=index, p=run.proc: exits.put((i, p.wait())), daemon=True
            ).start()
        remaining = len(running)
        while remaining and result is None:
            try:
                index, code = exits.get(timeout=0.05)
            except queue.Empty:
                if stop.is_set():
                    code = 128 + stop.signum if stop.signum else 1
                    result = GroupResult(Outcome.STOPPED, code)
                    err.write(f"ds-launch: {stop.reason}; stopping all processes\n".encode())
                elif watchdog is not None and time.monotonic() >= next_check:
                    next_check = time.monotonic() + 0.1  # a stat per member, ten times a second
                    result = _check_hang(watchdog, running, remaining, err, timeout_source)
                continue
            running[index].exited = True
            remaining -= 1
            if watchdog is not None:
                watchdog.member_exited(running[index].member.name, code)
            if code != 0:
                name = running[index].member.name
                result = GroupResult(Outcome.MEMBER_FAILED, exit_code_of(code), name)
                stopping = f"; stopping the other {remaining} process(es)" if remaining else ""
                err.write(
                    f"ds-launch: {name} exited with code {exit_code_of(code)}{stopping}\n".encode()
                )
        if result is None and stop.is_set() and len(running) < len(members):
            code = 128 + stop.signum if stop.signum else 1
            result = GroupResult(Outcome.STOPPED, code)
    finally:
        _stop_all(running, exits, term_timeout)
        for run in running:
            for t in run.pumps:
                t.join(timeout=2.0)
            if run.log is not None:
                run.log.close()
    return result or GroupResult(Outcome.SUCCEEDED, 0)


def _check_hang(
    watchdog: ProgressWatchdog,
    running: list[_Running],
    remaining: int,
    err: _Output,
    source: str,
) -> GroupResult | None:
    hang = watchdog.poll([i for i, run in enumerate(running) if not run.exited])
    if hang is None:
        return None
    member = running[hang.index].member
    where = f" on host {member.host}" if member.host else ""
    others = remaining - 1
    stopping = f"; stopping it and the other {others} process(es)" if others else "; stopping it"
    err.write(
        f"ds-launch: {member.name}{where} made no progress for {hang.idle_s:.1f} s since "
        f"{hang.since} (limit {watchdog.timeout:g} s: {source}){stopping}; exit code "
        f"{HANG_EXIT_CODE}\n".encode()
    )
    return GroupResult(Outcome.HUNG, HANG_EXIT_CODE, member.name)


def _stop_all(running: list[_Running], exits: queue.Queue[tuple[int, int]], grace: float) -> None:
    alive = [run for run in running if not run.exited]
    if alive:
        for run in alive:
            if run.member.graceful is GracefulStop.CLOSE_STDIN and run.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    run.proc.stdin.close()
            else:
                _signal_tree(run, signal.SIGTERM)
        # An agent needs its own grace period to stop its ranks before its connection goes.
        slow = any(r.member.graceful is GracefulStop.CLOSE_STDIN for r in alive)
        deadline = time.monotonic() + grace + (5.0 if slow else 0.0)
        _drain(running, exits, deadline)
        for run in running:
            if not run.exited and run.member.graceful is GracefulStop.CLOSE_STDIN:
                _signal_tree(run, signal.SIGTERM)
        _drain(running, exits, time.monotonic() + (2.0 if slow else 0.0))
    # SIGKILL what is left, and the process group of every member: a rank that exited may have
    # left children (data-loader workers) behind.
    for run in running:
        _signal_tree(run, signal.SIGKILL)
    _drain(running, exits, time.monotonic() + 5.0)


def _drain(running: list[_Running], exits: queue.Queue[tuple[int, int]], deadline: float) -> None:
    while any(not run.exited for run in running):
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            return
        try:
            index, _ = exits.get(timeout=timeout)
        except queue.Empty:
            return
        running[index].exited = True
