"""The fault-tolerance experiments, shared by the tests (1-2 trials) and the benchmark
(benchmarks/fault/run_fault_trials.py, 10 trials): each returns a dict of what was measured.

* ``reference``: an uninterrupted run; the loss curve every other run must equal bitwise.
* ``kill_trial``: ds-launch --max_restarts with auto-resume; SIGKILL to one rank at a step.
* ``sigterm_trial``: SIGTERM to ds-launch with save_on_signal, then a second launch.
* ``stall_trial``: one rank stops taking part; plain processes (no launcher) so that the exit
  of every rank is the watchdog's doing.
* ``diverge_trial``: ZeRO-3 with a module called twice on one rank.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TRAIN = str(HERE / "train.py")
PROBE = str(HERE / "exit_probe.py")
REPO = HERE.parents[3]


def env(extra: dict[str, str] | None = None) -> dict[str, str]:
    e = dict(os.environ)
    srcs = [str(p) for p in sorted((REPO / "packages").glob("*/src"))]
    e["PYTHONPATH"] = os.pathsep.join(srcs + [e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    e.update(extra or {})
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_curve(out: str | Path, world: int) -> dict[int, dict[int, list[list[str]]]]:
    """rank -> step -> every recorded micro-loss list for that step (one per attempt)."""
    curves: dict[int, dict[int, list[list[str]]]] = {}
    for r in range(world):
        path = Path(out) / f"losses_rank{r}.jsonl"
        steps: dict[int, list[list[str]]] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    steps.setdefault(rec["step"], []).append(rec["loss"])
        curves[r] = steps
    return curves


def compare(ref: dict, got: dict, steps: int) -> dict[str, Any]:
    """Every step of every rank present, and every recorded value (re-runs after a resume
    included) equal to the reference bit for bit."""
    missing, mismatched, recomputed = [], [], 0
    for r, ref_steps in ref.items():
        for s in range(steps):
            want = ref_steps[s][0]
            have = got.get(r, {}).get(s)
            if not have:
                missing.append((r, s))
                continue
            recomputed += len(have) - 1
            mismatched += [(r, s) for h in have if h != want]
    return {"identical": not missing and not mismatched, "missing": missing,
            "mismatched": mismatched, "recomputed_steps": recomputed}  # fmt: skip


def _launch(out: Path, world: int, args: list[str], max_restarts: int = 0,
            term_timeout: float = 30.0, probe: bool = False) -> subprocess.Popen:  # fmt: skip
    cmd = [sys.executable, "-m", "ds_launcher", "--num_gpus", str(world),
           "--max_restarts", str(max_restarts), "--term_timeout", str(term_timeout)]  # fmt: skip
    cmd += [PROBE, TRAIN] if probe else [TRAIN]
    cmd += ["--out", str(out), *args]
    log = open(out / "launcher.log", "ab")  # noqa: SIM115 - closed by the caller via wait
    return subprocess.Popen(
        cmd, env=env({"FAULT_EXIT_DIR": str(out / "exit")}), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip


def _reap(proc: subprocess.Popen) -> None:
    """Stop a launcher left running by a failed experiment (SIGTERM: it stops its ranks)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _progress(out: Path) -> tuple[str, int] | None:
    try:
        port, step = (out / "progress").read_text().split()
        return port, int(step)
    except (OSError, ValueError):
        return None


def _wait_step(proc: subprocess.Popen, out: Path, step: int, limit: float) -> tuple[str, int]:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        p = _progress(out)
        if p is not None and p[1] >= step:
            return p
        if proc.poll() is not None:
            raise RuntimeError(
                f"job ended before step {step}: {(out / 'launcher.log').read_text()}"
            )
        time.sleep(0.02)
    raise TimeoutError(f"step {step} not reached in {limit} s")


def reference(out: Path, world: int = 2, steps: int = 12, extra: list[str] | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    proc = _launch(out, world, ["--steps", str(steps), *(extra or [])])
    rc = proc.wait(timeout=600)
    return {"rc": rc, "wall_s": time.monotonic() - t0, "curve": read_curve(out, world)}


def kill_trial(out: Path, ref_curve: dict, kill_rank: int, kill_step: int, delay_s: float,
               world: int = 2, steps: int = 12, extra: list[str] | None = None) -> dict:  # fmt: skip
    """SIGKILL ``kill_rank`` ``delay_s`` after rank 0 finished step ``kill_step``."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    proc = _launch(out, world, ["--steps", str(steps), "--auto_resume", *(extra or [])],
                   max_restarts=2)  # fmt: skip
    try:
        port, _ = _wait_step(proc, out, kill_step, 300)
    except BaseException:
        _reap(proc)
        raise
    time.sleep(delay_s)
    pid_port, pid = (out / "pids" / f"rank{kill_rank}").read_text().split()
    assert pid_port == port, "pid file of another attempt"
    t_kill, t_kill_wall = time.monotonic(), time.time()
    os.kill(int(pid), signal.SIGKILL)
    at = _progress(out)
    killed_in_step = at[1] if at is not None and at[0] == port else None
    rc = proc.wait(timeout=600)
    t_end = time.monotonic()
    starts = [json.loads(x) for x in (out / "starts.jsonl").read_text().splitlines()]
    resumed = starts[-1]["resumed"] if len(starts) > 1 else None
    restart_t = starts[-1]["t"] - t_kill_wall if len(starts) > 1 else None
    cmp = compare(ref_curve, read_curve(out, world), steps)
    return {"kill_rank": kill_rank, "kill_after_step": kill_step, "delay_s": round(delay_s, 3),
            "killed_in_step": killed_in_step,
            "rc": rc, "launches": len(starts), "resumed_from": resumed,
            "resumed_at_step": starts[-1]["step"] if len(starts) > 1 else None,
            "kill_to_resumed_start_s": round(restart_t, 2) if restart_t is not None else None,
            "kill_to_end_s": round(t_end - t_kill, 2), "wall_s": round(t_end - t0, 2),
            **cmp}  # fmt: skip


def sigterm_trial(out: Path, ref_curve: dict, at_step: int, world: int = 2, steps: int = 12,
                  extra: list[str] | None = None) -> dict:  # fmt: skip
    """SIGTERM to ds-launch after step ``at_step``; every rank should save and exit 0; a second
    launch resumes from that checkpoint and finishes with the reference curve."""
    out.mkdir(parents=True, exist_ok=True)
    args = ["--steps", str(steps), "--auto_resume", "--save_on_signal",
            "--save_every", "1000", *(extra or [])]  # fmt: skip
    proc = _launch(out, world, args, probe=True)
    try:
        port, _ = _wait_step(proc, out, at_step, 300)
    except BaseException:
        _reap(proc)
        raise
    t_sig = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    launcher_rc = proc.wait(timeout=120)
    t_stopped = time.monotonic()
    rank_rc = {}
    for r in range(world):
        f = out / "exit" / f"rank{r}.{port}"
        rank_rc[r] = int(f.read_text()) if f.exists() else None
    tags = sorted(os.path.basename(p) for p in glob.glob(str(out / "ckpt" / "global_step*")))
    proc2 = _launch(out, world, args, probe=True)
    rc2 = proc2.wait(timeout=600)
    starts = [json.loads(x) for x in (out / "starts.jsonl").read_text().splitlines()]
    cmp = compare(ref_curve, read_curve(out, world), steps)
    return {"signal_after_step": at_step, "launcher_rc": launcher_rc, "rank_exit_codes": rank_rc,
            "signal_to_exit_s": round(t_stopped - t_sig, 2), "checkpoints": tags,
            "second_launch_rc": rc2, "resumed_from": starts[-1]["resumed"],
            "resumed_at_step": starts[-1]["step"], **cmp}  # fmt: skip


def _spawn_ranks(out: Path, world: int, args: list[str]) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for r in range(world):
        e = env({"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
                 "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port)})  # fmt: skip
        log = open(out / f"rank{r}.log", "wb")  # noqa: SIM115
        procs.append(subprocess.Popen([sys.executable, TRAIN, "--out", str(out), *args], env=e,
                                      stdout=log, stderr=subprocess.STDOUT))  # fmt: skip
    return procs


def _wait_all(procs: list[subprocess.Popen], limit: float) -> dict[int, tuple[int | None, float]]:
    t0 = time.monotonic()
    done: dict[int, tuple[int | None, float]] = {}
    while len(done) < len(procs) and time.monotonic() - t0 < limit:
        for r, p in enumerate(procs):
            if r not in done and p.poll() is not None:
                done[r] = (p.returncode, time.monotonic())
        time.sleep(0.05)
    for r, p in enumerate(procs):
        if r not in done:
            p.kill()  # a hang: the experiment fails, but leaves nothing behind
            p.wait()
            done[r] = (None, time.monotonic())
    return done


def stall_trial(out: Path, stall_rank: int = 1, stall_step: int = 3, timeout_s: float = 30.0,
                world: int = 2, limit_extra_s: float = 60.0) -> dict:  # fmt: skip
    """One rank sleeps forever at a step; every rank must exit non-zero within timeout + 30 s."""
    out.mkdir(parents=True, exist_ok=True)
    args = ["--steps", "20", "--comms_timeout", str(timeout_s), "--stall_rank", str(stall_rank),
            "--stall_step", str(stall_step), "--save_every", "1000"]  # fmt: skip
    procs = _spawn_ranks(out, world, args)
    done = _wait_all(procs, limit=timeout_s + limit_extra_s + 60)
    t_stall = float((out / "stalled").read_text()) if (out / "stalled").exists() else None
    mono_now, wall_now = time.monotonic(), time.time()
    exit_after = {}
    for r, (_, t) in done.items():
        exit_after[r] = round(t - (mono_now - (wall_now - t_stall)), 2) if t_stall else None
    logs = {r: (out / f"rank{r}.log").read_text(errors="replace") for r in range(world)}
    return {"stall_rank": stall_rank, "stall_step": stall_step, "timeout_s": timeout_s,
            "exit_codes": {r: c for r, (c, _) in done.items()},
            "exit_after_stall_s": exit_after, "logs": logs}  # fmt: skip


def diverge_trial(out: Path, rank: int = 0, step: int = 2, timeout_s: float = 30.0,
                  world: int = 2) -> dict:  # fmt: skip
    """ZeRO-3, ``blocks.1`` called twice on ``rank`` at ``step``."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    args = ["--steps", "6", "--stage", "3", "--gas", "1", "--comms_timeout", str(timeout_s),
            "--diverge_rank", str(rank), "--diverge_step", str(step), "--save_every", "1000"]  # fmt: skip
    procs = _spawn_ranks(out, world, args)
    done = _wait_all(procs, limit=timeout_s + 90)
    logs = {r: (out / f"rank{r}.log").read_text(errors="replace") for r in range(world)}
    t_div = float((out / "diverged").read_text()) if (out / "diverged").exists() else None
    mono_now, wall_now = time.monotonic(), time.time()
    return {"exit_codes": {r: c for r, (c, _) in done.items()},
            "exit_after_start_s": {r: round(t - t0, 2) for r, (_, t) in done.items()},
            "exit_after_divergence_s": {
                r: round(wall_now - (mono_now - t) - t_div, 2) if t_div else None
                for r, (_, t) in done.items()},
            "logs": logs}  # fmt: skip
