"""Cost of the ds_comm logging layer on a tight all-reduce loop (CPU, gloo, 2 ranks).

Three variants run interleaved: every trial runs a block of ``--iters`` calls of each, in a random
order that is the same on every rank, with a barrier between blocks, and every call is timed on
its own. Machine noise (other processes on a shared machine) hits all variants alike, and the
median of per-call latencies ignores the calls a context switch hit:

* ``torch``: ``torch.distributed.all_reduce`` directly (the peer);
* ``ds_comm_off``: ``ds_comm.all_reduce`` with its logger disabled (the claim: < 2% slower);
* ``ds_comm_on``: ``ds_comm.all_reduce`` with the logger recording every call (informational).

The overhead is median(per-call latency of the variant) / median(per-call latency of torch) - 1
over all calls of all trials; per-trial ratios of block means are kept in the JSON too.
Writes benchmarks/results/comm-logger-overhead-cpu-<yyyymmdd>.json (and $OUT/ if set), in the shared
results schema (benchmarks/_results.py).

    python benchmarks/comm/logger_overhead.py [--iters 2000] [--trials 21] [--numel 256]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from ds_comm.testing import run_distributed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared results writer
from _results import RESULTS_DIR, write_results  # noqa: E402

VARIANTS = ("torch", "ds_comm_off", "ds_comm_on")
SYSTEMS = {
    "torch": "torch.distributed.all_reduce",
    "ds_comm_off": "ds_comm.all_reduce (logger off)",
    "ds_comm_on": "ds_comm.all_reduce (logger on)",
}


def _bench(iters: int, trials: int, numel: int) -> dict:
    import torch.distributed as dist

    import ds_comm

    torch.set_num_threads(1)
    t = torch.ones(numel)
    on = ds_comm.CommsLogger(enabled=True)
    off = ds_comm.CommsLogger(enabled=False)

    calls = {
        "torch": lambda: dist.all_reduce(t),
        "ds_comm_off": lambda: ds_comm.all_reduce(t, logger=off),
        "ds_comm_on": lambda: ds_comm.all_reduce(t, logger=on),
    }
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}

    def run(variant: str, keep: bool = True) -> float:
        call, clock, out = calls[variant], time.perf_counter, samples[variant]
        dist.barrier()
        t_block = clock()
        for _ in range(iters):
            t0 = clock()
            call()
            if keep:
                out.append(clock() - t0)
        return (clock() - t_block) / iters

    for v in VARIANTS:  # warm up every path
        run(v, keep=False)
    rng = random.Random(0)  # same order on every rank
    per_trial: list[dict[str, float]] = []
    for _ in range(trials):
        order = list(VARIANTS)
        rng.shuffle(order)
        per_trial.append({v: run(v) for v in order})
    return {
        "per_trial_s": per_trial,
        "median_call_s": {v: statistics.median(samples[v]) for v in VARIANTS},
        "calls_per_variant": len(samples["torch"]),
        "logged_calls": on.stats()[0].count,
    }


def _layer_cost_us(numel: int, reps: int = 7, n: int = 100_000) -> float:
    """The layer's own cost per call, without communication: ``ds_comm.all_reduce`` (logger
    off) and ``torch.distributed.all_reduce`` both call a no-op in place of the backend; the
    median difference is what the layer adds. Run in this (parent) process after the ranks end."""
    import torch.distributed as dist

    import ds_comm

    t = torch.ones(numel)
    real = dist.all_reduce
    dist.all_reduce = lambda *a, **k: None  # both paths resolve dist.all_reduce at call time
    try:
        diffs = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(n):
                dist.all_reduce(t)
            direct = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(n):
                ds_comm.all_reduce(t)
            diffs.append((time.perf_counter() - t0 - direct) / n)
    finally:
        dist.all_reduce = real
    return statistics.median(diffs) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--numel", type=int, default=256)
    a = ap.parse_args()
    res = run_distributed(_bench, 2, args=(a.iters, a.trials, a.numel), timeout=1200)[0]
    trials = res["per_trial_s"]
    med = res["median_call_s"]
    summary = {}
    for v in VARIANTS:
        summary[v] = {
            "median_us_per_call": med[v] * 1e6,
            "ratio_vs_torch": med[v] / med["torch"],
            "overhead_pct": (med[v] / med["torch"] - 1) * 100,
            "median_block_ratio_vs_torch": statistics.median(tr[v] / tr["torch"] for tr in trials),
        }
    layer_us = _layer_cost_us(a.numel)
    today = _dt.date.today()
    runs = [
        {
            "system": SYSTEMS[v],
            "us_per_call": s["median_us_per_call"],
            "overhead_pct": s["overhead_pct"],
            "median_block_ratio_vs_torch": s["median_block_ratio_vs_torch"],
            "peak_mem_gb": None,
        }
        for v, s in summary.items()
    ]
    ratios = {
        f"{SYSTEMS[v]}/{SYSTEMS['torch']} us_per_call": s["ratio_vs_torch"]
        for v, s in summary.items()
        if v != "torch"
    }
    write_results(
        scenario="comm-logger-overhead",
        device=f"cpu ({platform.processor() or platform.machine()}), gloo, 2 ranks, 1 thread",
        date=today.isoformat(),
        path=RESULTS_DIR / f"comm-logger-overhead-cpu-{today:%Y%m%d}.json",
        metric="us_per_call",
        torch=torch.__version__,
        numel=a.numel,
        dtype="float32",
        iters_per_trial=a.iters,
        trials=a.trials,
        calls_per_variant=res["calls_per_variant"],
        load_average_at_end=os.getloadavg(),
        claim_logger_off_overhead_below_2pct=summary["ds_comm_off"]["overhead_pct"] < 2.0,
        layer_cost_us_per_call_no_backend=layer_us,
        layer_cost_pct_of_torch_call=layer_us / summary["torch"]["median_us_per_call"] * 100,
        per_trial_s=trials,
        variants={SYSTEMS[v]: v for v in summary},
        runs=runs,
        ratios=ratios,
    )
    out = {"layer_cost_pct_of_torch_call": layer_us / summary["torch"]["median_us_per_call"] * 100}
    print(
        f"layer cost without communication: {layer_us:.2f} us/call "
        f"({out['layer_cost_pct_of_torch_call']:.2f}% of a torch all_reduce here)"
    )
    for v, s in summary.items():
        print(
            f"{v:>12}: {s['median_us_per_call']:8.2f} us/call  overhead {s['overhead_pct']:+.2f}%"
        )


if __name__ == "__main__":
    main()
