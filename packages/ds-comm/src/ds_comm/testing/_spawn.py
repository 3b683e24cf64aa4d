"""Spawning N ranks of a test function, with a hard timeout and every rank's traceback.

Each rank is a fresh ``spawn`` process in its own process group, so killing the group kills
whatever the rank started too. A rank writes its output to a log file the parent reads on
failure; ``faulthandler`` is armed on SIGUSR1 so the parent can ask every live rank for its
Python stacks before killing it. Nothing is left running when ``run_distributed`` returns or
raises.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import enum
import faulthandler
import importlib
import multiprocessing
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

DEFAULT_TIMEOUT = 120.0
#: how long the parent waits for live ranks to write their stacks after SIGUSR1
_STACK_DUMP_GRACE = 1.0
_POLL_S = 0.02
_LOG_TAIL_CHARS = 6000


class DistributedTestError(AssertionError):
    """One or more ranks failed; the message holds each rank's traceback and log tail."""


class DistributedTimeout(DistributedTestError):
    """The ranks did not finish in time; the message holds every rank's Python stack."""


class _RankOutcome(enum.Enum):
    """How a rank ended, as the parent sees it."""

    RUNNING = "running"
    PASSED = "passed"
    RAISED = "raised"  #: the test function raised; its traceback is in the .err file
    DIED = "died"  #: the process exited non-zero or by a signal without a Python traceback
    KILLED = "killed"  #: killed by the harness after another rank failed or the timeout


@dataclasses.dataclass(frozen=True)
class _FnRef:
    """A module-level function named by module and attribute, resolvable in a fresh process."""

    module: str
    qualname: str

    def resolve(self) -> Callable[..., Any]:
        obj: Any = importlib.import_module(self.module)
        for part in self.qualname.split("."):
            obj = getattr(obj, part)
        # A function decorated with distributed_test keeps the plain body here.
        return getattr(obj, "__ds_distributed_inner__", obj)


@dataclasses.dataclass(frozen=True)
class _RankSpec:
    rank: int
    world_size: int
    fn: _FnRef | Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    workdir: str
    master_port: int
    backend: str | None
    timeout: float
    env: dict[str, str]


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fn_ref(fn: Callable[..., Any] | _FnRef) -> _FnRef | Callable[..., Any]:
    if isinstance(fn, _FnRef):
        return fn
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", "")
    if module is None or "<locals>" in qualname or "<lambda>" in qualname:
        raise TypeError(
            f"run_distributed needs a module-level function so that a fresh process can import "
            f"it; got {qualname or fn!r} (a lambda or a function defined inside another). Move it "
            "to module level."
        )
    if module == "__main__":
        return fn  # pickled by value of reference; spawn re-imports __main__ as __mp_main__
    return _FnRef(module, qualname)


# --------------------------------------------------------------------------- child side
def _die_with_parent() -> None:
    # If the parent is killed (pytest timeout, ^C), the kernel kills the rank too.
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _rank_main(spec: _RankSpec) -> None:
    os.setpgid(0, 0)
    _die_with_parent()
    log_path = os.path.join(spec.workdir, f"rank{spec.rank}.log")
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    # A last resort if the parent is gone and PDEATHSIG is unavailable.
    faulthandler.dump_traceback_later(spec.timeout + 60.0, exit=True)

    os.environ.update(spec.env)
    os.environ.update(
        {
            "RANK": str(spec.rank),
            "LOCAL_RANK": str(spec.rank),
            "WORLD_SIZE": str(spec.world_size),
            "LOCAL_WORLD_SIZE": str(spec.world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(spec.master_port),
        }
    )
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    code = 0
    try:
        import torch

        if "TORCH_DISTRIBUTED_DEBUG" in spec.env:
            # torch reads this variable once, when torch.distributed is imported, and the rank
            # imported it (through ds_comm) before ``env`` was applied: re-read it, or
            # ``env={"TORCH_DISTRIBUTED_DEBUG": "DETAIL"}`` would be silently ignored.
            import torch.distributed as dist

            dist.set_debug_level_from_env()

        # N ranks share the cores: without this each rank starts a thread per core and the
        # test runs many times slower than it needs to.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.world_size))
        if spec.backend is not None:
            _init_process_group(spec)
        fn = spec.fn.resolve() if isinstance(spec.fn, _FnRef) else spec.fn
        result = fn(*spec.args, **spec.kwargs)
        with open(os.path.join(spec.workdir, f"rank{spec.rank}.out"), "wb") as f:
            pickle.dump(result, f)
    except BaseException:  # noqa: BLE001 - every failure, SystemExit included, is reported
        # when it failed, on the machine-wide monotonic clock: a rank that raises takes its
        # peers' collectives down with it, often before the supervisor looks, and the report
        # must still name the first failure (file mtimes are too coarse to order them)
        with open(os.path.join(spec.workdir, f"rank{spec.rank}.failed_at"), "w") as f:
            f.write(repr(time.monotonic()))
        with open(os.path.join(spec.workdir, f"rank{spec.rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        code = 1
    finally:
        with contextlib.suppress(Exception):
            import torch.distributed as dist

            if code == 0 and dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def _init_process_group(spec: _RankSpec) -> None:
    import datetime

    import torch.distributed as dist

    dist.init_process_group(
        backend=spec.backend,
        init_method=f"file://{os.path.join(spec.workdir, 'store')}",
        rank=spec.rank,
        world_size=spec.world_size,
        timeout=datetime.timedelta(seconds=spec.timeout),
    )


# --------------------------------------------------------------------------- parent side
def _read(path: str, tail: int | None = None) -> str:
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return ""
    return text[-tail:] if tail else text


def _kill_group(proc: multiprocessing.process.BaseProcess, sig: int) -> None:
    if proc.pid is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(proc.pid, sig)


def _outcome(proc: multiprocessing.process.BaseProcess, workdir: str, rank: int) -> _RankOutcome:
    if proc.exitcode is None:
        return _RankOutcome.RUNNING
    if proc.exitcode == 0:
        return _RankOutcome.PASSED
    if os.path.exists(os.path.join(workdir, f"rank{rank}.err")):
        return _RankOutcome.RAISED
    return _RankOutcome.DIED


def _failed_at(workdir: str, rank: int) -> float:
    """When ``rank`` recorded its failure (monotonic clock); +inf for a rank that died without
    recording one (killed by a signal, os._exit elsewhere), which sorts it last."""
    try:
        return float(_read(os.path.join(workdir, f"rank{rank}.failed_at")))
    except ValueError:
        return float("inf")


def _describe(proc, workdir: str, rank: int, outcome: _RankOutcome) -> str:
    lines = [f"===== rank {rank}: {outcome.value} (exit code {proc.exitcode}) ====="]
    err = _read(os.path.join(workdir, f"rank{rank}.err"))
    if err:
        lines.append(err.rstrip())
    log = _read(os.path.join(workdir, f"rank{rank}.log"), tail=_LOG_TAIL_CHARS)
    if log.strip():
        lines.append(f"----- rank {rank} output (stacks appear here on a hang) -----")
        lines.append(log.rstrip())
    return "\n".join(lines)


def _stop_all(procs, alive_first_dump: bool) -> None:
    live = [p for p in procs if p.exitcode is None]
    if alive_first_dump and live:
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGUSR1)
        time.sleep(_STACK_DUMP_GRACE)
    for p in procs:
        _kill_group(p, signal.SIGKILL)
    for p in procs:
        p.join(timeout=10)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    backend: str | None = "gloo",
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` fresh processes; return each rank's result.

    With ``backend`` set (default gloo), every rank has an initialised default process group
    (file store in a private directory) before ``fn`` runs; with ``backend=None`` the ranks only
    get RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and a free MASTER_PORT, for
    code that initialises itself. ``env`` is set in every rank before the process group exists
    (``TORCH_DISTRIBUTED_DEBUG`` included, which torch otherwise reads only at import). If any
    rank fails, all ranks are stopped and :class:`DistributedTestError` is raised with every
    rank's traceback; past ``timeout`` seconds, :class:`DistributedTimeout` with every rank's
    stack. No process survives the call.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if timeout <= 0:
        raise ValueError(f"timeout must be positive seconds, got {timeout}")
    ref = _fn_ref(fn)
    workdir = tempfile.mkdtemp(prefix="ds_dist_")
    port = free_port()
    ctx = multiprocessing.get_context("spawn")
    procs = []
    try:
        for rank in range(world_size):
            spec = _RankSpec(
                rank, world_size, ref, tuple(args), dict(kwargs or {}), workdir, port,
                backend, timeout, dict(env or {}),
            )  # fmt: skip
            p = ctx.Process(target=_rank_main, args=(spec,), name=f"ds-rank-{rank}")
            p.start()
            procs.append(p)
        return _supervise(procs, workdir, timeout, fn)
    finally:
        _stop_all(procs, alive_first_dump=False)
        shutil.rmtree(workdir, ignore_errors=True)


def _supervise(procs, workdir: str, timeout: float, fn) -> list[Any]:
    deadline = time.monotonic() + timeout
    name = fn.qualname if isinstance(fn, _FnRef) else getattr(fn, "__qualname__", repr(fn))
    while True:
        outcomes = [_outcome(p, workdir, r) for r, p in enumerate(procs)]
        failed = [
            r for r, o in enumerate(outcomes) if o in (_RankOutcome.RAISED, _RankOutcome.DIED)
        ]
        if failed:
            failed.sort(key=lambda r: _failed_at(workdir, r))  # first failure first
            _stop_all(procs, alive_first_dump=True)
            report = []
            for r, p in enumerate(procs):
                o = (
                    outcomes[r]
                    if r in failed or outcomes[r] == _RankOutcome.PASSED
                    else _RankOutcome.KILLED
                )
                report.append(_describe(p, workdir, r, o))
            raise DistributedTestError(
                f"{name}: rank(s) {failed} of {len(procs)} failed, rank {failed[0]} first; the "
                "other ranks were stopped.\n" + "\n".join(report)
            )
        if all(o == _RankOutcome.PASSED for o in outcomes):
            results = []
            for r in range(len(procs)):
                with open(os.path.join(workdir, f"rank{r}.out"), "rb") as f:
                    results.append(pickle.load(f))
            return results
        if time.monotonic() > deadline:
            stuck = [r for r, o in enumerate(outcomes) if o == _RankOutcome.RUNNING]
            _stop_all(procs, alive_first_dump=True)
            report = [_describe(p, workdir, r, _RankOutcome.KILLED if r in stuck else outcomes[r])
                      for r, p in enumerate(procs)]  # fmt: skip
            raise DistributedTimeout(
                f"{name}: timed out after {timeout:.0f} s with rank(s) {stuck} still running; "
                "all ranks were killed. Each rank's Python stack at the timeout follows.\n"
                + "\n".join(report)
            )
        time.sleep(_POLL_S)
