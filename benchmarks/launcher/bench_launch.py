"""ds-launch vs torchrun vs DeepSpeed's launcher, side by side on this machine (CPU ranks).

Scenarios (4 ranks, plain-Python ranks so the launcher, not the job, is what is measured):
  startup    every rank exits 0 at once: launcher wall time (start-up + teardown overhead)
  fail_fast  rank 1 exits 3 once all ranks run, the others sleep 60 s: seconds from the failure
             to the launcher's exit, the launcher's exit code, and ranks still alive after it

Usage: python benchmarks/launcher/bench_launch.py [--reps 3] [--peers ds-launch,torchrun,deepspeed]
Writes benchmarks/results/launcher-<device>-<yyyymmdd>.json (and a copy under $OUT when set).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared results writer
from _results import write_results  # noqa: E402

RANK_SCRIPT = r"""
import os, sys, time
out = os.environ["BENCH_OUT"]
rank = os.environ.get("RANK", "?")
with open(os.path.join(out, f"pid_{rank}"), "w") as f:
    f.write(str(os.getpid()))
if os.environ["BENCH_MODE"] == "fail_fast":
    if rank == "1":
        world = int(os.environ["WORLD_SIZE"])
        while len([p for p in os.listdir(out) if p.startswith("pid_")]) < world:
            time.sleep(0.01)
        with open(os.path.join(out, "failed_at"), "w") as f:
            f.write(repr(time.time()))
        os._exit(3)
    time.sleep(60)
"""

NPROC = 4


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(peer: str, script: str) -> list[str]:
    py, port = sys.executable, str(_port())
    if peer == "ds-launch":
        return [py, "-m", "ds_launcher", "--num_gpus", str(NPROC), "--master_port", port, script]
    if peer == "torchrun":
        return [py, "-m", "torch.distributed.run", "--nproc_per_node", str(NPROC),
                "--master_port", port, script]  # fmt: skip
    if peer == "deepspeed":
        return [py, "-m", "deepspeed.launcher.runner", "--num_gpus", str(NPROC),
                "--master_port", port, script]  # fmt: skip
    raise ValueError(peer)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] != b"Z"


def run_once(peer: str, mode: str, script: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, BENCH_OUT=out, BENCH_MODE=mode, DS_ACCELERATOR="cpu")
        start = time.time()
        proc = subprocess.run(
            _command(peer, script), env=env, capture_output=True, timeout=300, cwd=out
        )
        end = time.time()
        pids = [int(p.read_text()) for p in Path(out).glob("pid_*")]
        alive = [p for p in pids if _alive(p)]
        for pid in alive:  # the benchmark's own ranks: do not leave them behind
            os.kill(pid, signal.SIGKILL)
        record = {"exit_code": proc.returncode, "wall_s": end - start, "ranks_left": len(alive)}
        if mode == "fail_fast":
            failed_at = Path(out, "failed_at")
            record["exit_after_failure_s"] = (
                end - float(failed_at.read_text()) if failed_at.exists() else None
            )
        return record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--peers", default="ds-launch,torchrun,deepspeed")
    args = parser.parse_args()
    peers = [p for p in args.peers.split(",") if p]
    available = {
        "ds-launch": importlib.util.find_spec("ds_launcher") is not None,
        "torchrun": importlib.util.find_spec("torch") is not None,
        "deepspeed": importlib.util.find_spec("deepspeed") is not None,
    }
    peers = [p for p in peers if available[p]]
    results: dict = {}
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(RANK_SCRIPT)
        script = f.name
    try:
        for mode in ("startup", "fail_fast"):
            runs: dict[str, list[dict]] = {p: [] for p in peers}
            for _ in range(args.reps):  # interleaved, so load changes hit every peer alike
                for peer in peers:
                    runs[peer].append(run_once(peer, mode, script))
            summary = {}
            for peer, recs in runs.items():
                key = "exit_after_failure_s" if mode == "fail_fast" else "wall_s"
                vals = [r[key] for r in recs if r.get(key) is not None]
                summary[peer] = {
                    "median_" + key: statistics.median(vals) if vals else None,
                    "exit_codes": sorted({r["exit_code"] for r in recs}),
                    "max_ranks_left": max(r["ranks_left"] for r in recs),
                    "runs": recs,
                }
            base = summary.get("ds-launch", {})
            key = "median_exit_after_failure_s" if mode == "fail_fast" else "median_wall_s"
            for peer in peers:
                if peer != "ds-launch" and base.get(key) and summary[peer].get(key):
                    summary[peer]["ratio_peer_over_ds_launch"] = summary[peer][key] / base[key]
            results[mode] = summary
    finally:
        os.unlink(script)
    device = f"cpu-{os.cpu_count()}core"
    runs, ratios = [], {}
    for peer in peers:
        run: dict = {"system": peer}
        for mode, metric in (("startup", "startup_s"), ("fail_fast", "exit_after_failure_s")):
            s = results[mode][peer]
            key = "median_" + metric.replace("startup_s", "wall_s")
            run[metric] = s[key]
            run[mode] = {k: v for k, v in s.items() if k not in (key, "ratio_peer_over_ds_launch")}
            if "ratio_peer_over_ds_launch" in s:
                ratios[f"{peer}/ds-launch {metric}"] = s["ratio_peer_over_ds_launch"]
        if run["startup_s"] is None and run["exit_after_failure_s"] is None:
            run["error"] = "no run of this launcher finished (see exit_codes)"
        runs.append({**run, "peak_mem_gb": None})
    target = write_results(
        scenario="launcher",
        device=device,
        date=datetime.date.today().isoformat(),
        path=Path(__file__).resolve().parents[1]
        / "results"
        / f"launcher-{device}-{datetime.date.today():%Y%m%d}.json",
        metric=["startup_s", "exit_after_failure_s"],
        machine=platform.platform(),
        python=platform.python_version(),
        nproc=NPROC,
        reps=args.reps,
        runs=runs,
        ratios=ratios,
    )
    print(f"wrote {target}")
    for mode, summary in results.items():
        for peer, s in summary.items():
            brief = {k: v for k, v in s.items() if k != "runs"}
            print(mode, peer, brief)


if __name__ == "__main__":
    main()
