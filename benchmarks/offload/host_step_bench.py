"""The host side of an offloaded step with clipping: the unscale x clip factor applied inside
CPU Adam's pass (ds-offload >= 0.1.4) against a separate pass over the host gradients first
(ds-offload 0.1.3, and DeepSpeed, whose ZeRO-Offload multiplies its CPU gradient buffer by the
combined factor before DeepSpeedCPUAdam steps).

    python benchmarks/offload/host_step_bench.py --params 200e6 --threads 0

Contenders, same process, same threads, timed in interleaved rounds (one step each per round):
* ``fused``: ``cpu_optim.adam(..., grad_scale=s)``;
* ``separate``: ``grad.mul_(s)`` (torch, same thread count), then ``cpu_optim.adam``;
* ``deepspeed``: ``grad.mul_(s)``, then ``DeepSpeedCPUAdam.step()`` (optional, JIT-built).
The factor alternates between s and 1/s so the gradients stay bounded over the rounds.
Writes benchmarks/results/host-step-<device>-<yyyymmdd>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))
from cpu_adam_bench import cpu_model, slug  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared results writer
from _results import runs_from_columns, write_results  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--params", type=float, default=200e6)
    ap.add_argument("--tensors", type=int, default=8, help="partitions (one adam call each)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=0, help="0: all usable cores")
    ap.add_argument("--scale", type=float, default=0.37, help="the unscale x clip factor")
    ap.add_argument("--no-deepspeed", action="store_true")
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parents[1] / "results")
    args = ap.parse_args()
    threads = args.threads or len(os.sched_getaffinity(0))
    os.environ["OMP_NUM_THREADS"] = str(threads)  # DeepSpeed's op takes OpenMP's team size
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    import ds_kernels

    torch.set_num_threads(threads)
    op = ds_kernels.load("cpu_optim")
    n = int(args.params) // args.tensors
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(n, generator=gen) * 1e-2 for _ in range(args.tensors)]

    def state() -> dict[str, list[torch.Tensor]]:
        g = torch.Generator().manual_seed(1)
        p = [torch.randn(n, generator=g) for _ in range(args.tensors)]
        return {"p": p, "m": [torch.zeros(n) for _ in p], "v": [torch.zeros(n) for _ in p],
                "out": [torch.empty(n, dtype=torch.bfloat16) for _ in p]}  # fmt: skip

    hp = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled=True,
              bias_correction1=[0.1], bias_correction2_sqrt=[0.03], num_threads=threads)  # fmt: skip

    def ours(st: dict, s: float, fused: bool) -> None:
        for i, g in enumerate(grads):
            if not fused:
                g.mul_(s)
            op.adam([st["p"][i]], [g], [st["m"][i]], [st["v"][i]], [st["out"][i]], **hp,
                    grad_scale=s if fused else 1.0)  # fmt: skip

    contenders = {"fused": (state(), True), "separate": (state(), False)}
    steps = {name: (lambda s, st=st, f=f: ours(st, s, f)) for name, (st, f) in contenders.items()}
    skipped, ds_version = {}, None
    if not args.no_deepspeed:
        try:
            import deepspeed
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            ds_version = deepspeed.__version__
            ps = [torch.nn.Parameter(t) for t in state()["p"]]
            for p, g in zip(ps, grads):
                p.grad = g
            ds_opt = DeepSpeedCPUAdam(ps, lr=1e-3, weight_decay=0.01, adamw_mode=True)

            def deepspeed_step(s: float) -> None:
                for g in grads:
                    g.mul_(s)
                ds_opt.step()

            steps["deepspeed"] = deepspeed_step
        except Exception as exc:  # noqa: BLE001 - optional peer
            skipped["deepspeed"] = f"{type(exc).__name__}: {exc}"[:300]

    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(1 + args.rounds):
        s = args.scale if r % 2 == 0 else 1.0 / args.scale
        for name, step in steps.items():
            t0 = time.perf_counter()
            step(s)
            if r:  # round 0 warms up
                times[name].append((time.perf_counter() - t0) * 1e3)
        if r:
            print(f"round {r}: " + ", ".join(f"{k}={v[-1]:.1f} ms" for k, v in times.items()),
                  flush=True)  # fmt: skip
    med = {k: statistics.median(v) for k, v in times.items()}
    device = f"{slug(cpu_model())}-{threads}t"
    result = {
        "scenario": "offload host step with clipping (unscale x clip factor)",
        "device": device, "threads": threads, "params": n * args.tensors,
        "partitions": args.tensors, "scale": args.scale, "median_ms": med,
        "all_ms": times, "speedup_of_fused_over": {k: med[k] / med["fused"] for k in med if k != "fused"},
        "skipped": skipped, "ds_kernels_backend": str(op.backend), "isa": getattr(op, "isa", None),
        "versions": {"torch": torch.__version__, "ds_kernels": ds_kernels.__version__,
                     "deepspeed": ds_version},
        "load_average_at_end": os.getloadavg(), "date": datetime.date.today().isoformat(),
    }  # fmt: skip
    speedups = result.pop("speedup_of_fused_over")
    columns = {"step_ms": result.pop("median_ms"), "all_ms": result.pop("all_ms")}
    out = write_results(
        path=args.out_dir / f"host-step-{device}-{datetime.date.today():%Y%m%d}.json",
        metric="step_ms",
        runs=runs_from_columns(columns),
        ratios={f"fused/{n} step_ms": v for n, v in speedups.items()},
        **result,
    )
    print(json.dumps({"device": device, "step_ms": columns["step_ms"], "speedups": speedups,
                      "skipped": skipped}, indent=2))  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
