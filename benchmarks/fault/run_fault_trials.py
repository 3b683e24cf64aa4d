"""Reliability trials for ds-all's fault tolerance, CPU, gloo, 2 ranks.

    python benchmarks/fault/run_fault_trials.py [--trials 10] [--out DIR]

* kill: ``--trials`` runs of ds-launch --max_restarts 2 with checkpoint.auto_resume, SIGKILL to
  a random rank at a random step (plus a random 0-0.15 s delay, so kills land anywhere in a
  step, including inside a checkpoint save; steps are slowed by 0.1 s so that the kill lands
  near the drawn step, recorded as killed_in_step); each run's per-rank loss curve is compared bit for bit
  with an uninterrupted run's (steps re-run after the resume included).
* sigterm: SIGTERM to ds-launch at a random step with checkpoint.save_on_signal; the exit status
  of every rank (recorded by an exit probe), then a second launch that must resume and match.
* stall: one rank sleeps forever (rank 1, then rank 0, which hosts the store); every rank must
  exit non-zero within comms_timeout (30 s) + 30 s, naming the stalled rank.
* diverge: ZeRO-3 with blocks.1 called twice on one rank: error naming the module.

Writes benchmarks/results/fault-trials-cpu-<yyyymmdd>.json (and a copy under $OUT if set), in the
shared results schema (benchmarks/_results.py): one run per trial, its kind in ``trial``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "packages" / "ds-all" / "tests" / "fault_scripts"))
import experiments as ex  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))  # the shared results writer
from _results import write_results  # noqa: E402

# each trial kind's time: kill -> resumed training, signal -> exit, stall/divergence -> all exited
METRICS = ["kill_to_resumed_start_s", "signal_to_exit_s", "exit_after_stall_s_max",
           "exit_after_divergence_s_max"]  # fmt: skip


def _summary_of_logs(logs: dict, needle: str) -> dict:
    return {r: needle in text for r, text in logs.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--sigterm_trials", type=int, default=3)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--only", default=None, help="comma list of kill,sigterm,stall,diverge")
    p.add_argument("--out", default=None, help="work dir (default: a temp dir, removed)")
    a = p.parse_args()
    rng = random.Random(a.seed)
    work = Path(a.out or tempfile.mkdtemp(prefix="fault-trials-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    ref = ex.reference(work / "reference", steps=a.steps)
    assert ref["rc"] == 0, "the uninterrupted run failed"
    ref_curve = ref["curve"]
    result: dict = {
        "scenario": "fault-trials", "device": f"cpu ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, shared)", "world_size": 2, "backend": "gloo",
        "steps": a.steps, "save_every": 3, "seed": a.seed,
        "reference_wall_s": round(ref["wall_s"], 2), "kill": [], "sigterm": [], "stall": [],
        "diverge": [],
    }  # fmt: skip

    only = set(a.only.split(",")) if a.only else {"kill", "sigterm", "stall", "diverge"}
    for i in range(a.trials if "kill" in only else 0):
        rank, step = rng.randrange(2), rng.randint(1, a.steps - 2)
        delay = rng.uniform(0.0, 0.15)
        t = ex.kill_trial(work / f"kill{i}", ref_curve, rank, step, delay, steps=a.steps,
                          extra=["--step_sleep", "0.1"])  # fmt: skip
        print(json.dumps(t), flush=True)
        result["kill"].append(t)

    for i in range(a.sigterm_trials if "sigterm" in only else 0):
        step = rng.randint(1, a.steps - 4)
        t = ex.sigterm_trial(work / f"sigterm{i}", ref_curve, step, steps=a.steps,
                             extra=["--step_sleep", "0.1"])  # fmt: skip
        print(json.dumps(t), flush=True)
        result["sigterm"].append(t)

    for stall_rank in (1, 0) if "stall" in only else ():
        t = ex.stall_trial(work / f"stall{stall_rank}", stall_rank=stall_rank, stall_step=3)
        logs = t.pop("logs")
        t["names_stalled_rank"] = _summary_of_logs(logs, f"stalled rank(s): {stall_rank}")
        t["names_collective"] = _summary_of_logs(logs, "is in collective #")
        t["message_rank0_excerpt"] = [
            line for line in logs[(stall_rank + 1) % 2].splitlines() if line.startswith("[ds_all]")
        ][-5:]
        print(json.dumps(t), flush=True)
        result["stall"].append(t)

    for rank in (0, 1) if "diverge" in only else ():
        t = ex.diverge_trial(work / f"diverge{rank}", rank=rank, step=2)
        logs = t.pop("logs")
        want = "module 'blocks.1' ran " + (
            "2 time(s) on rank 0, 1 time(s) on rank 1" if rank == 0
            else "1 time(s) on rank 0, 2 time(s) on rank 1"
        )  # fmt: skip
        t["diverge_rank"] = rank
        t["names_module"] = _summary_of_logs(logs, want)
        print(json.dumps(t), flush=True)
        result["diverge"].append(t)

    kills = result["kill"]
    result["summary"] = {
        "kill_trials": len(kills),
        "kill_identical": sum(t["identical"] and t["rc"] == 0 for t in kills),
        "kill_recomputed_steps": sum(t["recomputed_steps"] for t in kills),
        "kill_to_resumed_start_s_median": sorted(t["kill_to_resumed_start_s"] for t in kills)[
            len(kills) // 2] if kills else None,
        "sigterm_trials": len(result["sigterm"]),
        "sigterm_all_ranks_exit_0": sum(
            all(c == 0 for c in t["rank_exit_codes"].values()) for t in result["sigterm"]),
        "sigterm_resumed_identical": sum(t["identical"] for t in result["sigterm"]),
        "stall_all_exit_nonzero_within_timeout_plus_30": sum(
            all(c not in (None, 0) for c in t["exit_codes"].values())
            and all(x is not None and x <= t["timeout_s"] + 30 for x in t["exit_after_stall_s"].values())
            for t in result["stall"]),
        "diverge_named_module": sum(all(t["names_module"].values()) for t in result["diverge"]),
        "total_wall_s": round(time.time() - t_start, 1),
    }  # fmt: skip
    day = datetime.date.today().strftime("%Y%m%d")
    name = "fault-trials" if a.only is None else "fault-" + a.only.replace(",", "-")
    runs = []
    for kind in ("kill", "sigterm", "stall", "diverge"):
        for t in result.pop(kind):
            run = {"system": "ds-launch + ds-all", "trial": kind, **t}
            # the time to detection is the last rank's exit: max over the ranks that exited
            for per_rank in ("exit_after_stall_s", "exit_after_divergence_s"):
                if per_rank in t:
                    done = [v for v in t[per_rank].values() if v is not None]
                    run[per_rank + "_max"] = max(done) if done else None
            if not any(isinstance(run.get(m), (int, float)) for m in METRICS):
                run["error"] = "no time recorded (a rank did not exit)"
            runs.append({**run, "peak_mem_gb": None})
    dest = write_results(
        path=REPO / "benchmarks" / "results" / f"{name}-cpu-{day}.json",
        date=datetime.date.today().isoformat(),
        metric=METRICS,
        runs=runs,
        ratios={},
        **result,
    )
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {dest}")
    if a.out is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
