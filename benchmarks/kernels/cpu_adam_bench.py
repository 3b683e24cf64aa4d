"""CPU Adam step: ds_kernels.CPUAdam vs torch.optim.AdamW(foreach=True) vs DeepSpeedCPUAdam.

Same process, same thread count, same parameters and gradients; the contenders are timed in
interleaved rounds (one step of each per round) so that load from other processes hits all
of them alike. Writes benchmarks/results/cpu-adam-<device>-<yyyymmdd>.json with per-step
times and the ratios against CPUAdam.

    python benchmarks/kernels/cpu_adam_bench.py                 # 200M params, all cores
    python benchmarks/kernels/cpu_adam_bench.py --params 50e6 --threads 2

DeepSpeed is optional: with `deepspeed` importable its cpu_adam op is JIT-built (about a
minute) and timed too; otherwise the JSON says why it was skipped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared results writer
from _results import runs_from_columns, write_results  # noqa: E402


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--params", type=float, default=200e6, help="total parameters (default 200M)")
    ap.add_argument("--tensors", type=int, default=8, help="split into this many tensors")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (one step each)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="threads for all (0: all cores)")
    ap.add_argument("--no-deepspeed", action="store_true")
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parents[1] / "results")
    return ap.parse_args()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def main() -> int:
    args = parse_args()
    threads = args.threads or os.cpu_count() or 1
    # DeepSpeed's op uses OpenMP's default team size: pin it to the same count as the others.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    import ds_kernels

    torch.set_num_threads(threads)
    n_total = int(args.params)
    sizes = [n_total // args.tensors] * args.tensors
    sizes[-1] += n_total - sum(sizes)
    kw = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(n, generator=gen) for n in sizes]
    grads = [torch.randn(n, generator=gen) * 1e-2 for n in sizes]

    def fresh_params() -> list[torch.nn.Parameter]:
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        for p, g in zip(ps, grads):
            p.grad = g  # shared, read-only for every contender
        return ps

    contenders: dict[str, tuple[torch.optim.Optimizer, list[torch.nn.Parameter]]] = {}
    skipped: dict[str, str] = {}
    ps = fresh_params()
    ours = ds_kernels.CPUAdam(ps, num_threads=threads, **kw)
    contenders["ds_kernels.CPUAdam"] = (ours, ps)
    ps = fresh_params()
    contenders["torch.optim.AdamW(foreach=True)"] = (torch.optim.AdamW(ps, foreach=True, **kw), ps)
    ds_version = None
    if args.no_deepspeed:
        skipped["deepspeed.DeepSpeedCPUAdam"] = "--no-deepspeed"
    else:
        try:
            import deepspeed
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            ds_version = deepspeed.__version__
            ps = fresh_params()
            ds_opt = DeepSpeedCPUAdam(ps, adamw_mode=True, **kw)
            contenders["deepspeed.DeepSpeedCPUAdam"] = (ds_opt, ps)
        except Exception as exc:  # noqa: BLE001 - optional peer
            skipped["deepspeed.DeepSpeedCPUAdam"] = f"{type(exc).__name__}: {exc}"[:300]

    # Memory roofline of this machine at this thread count: a parallel copy of 1 GiB moves
    # 2 GiB (read + write); Adam must move 28 bytes per param.
    src = torch.empty(2**28)
    dst = torch.empty_like(src)
    copy_s = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        copy_s.append(time.perf_counter() - t0)
    copy_gbps = 2 * src.numel() * 4 / statistics.median(copy_s[1:]) / 1e9
    del src, dst

    times: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(args.warmup + args.rounds):
        for name, (opt, _) in contenders.items():
            t0 = time.perf_counter()
            opt.step()
            dt = time.perf_counter() - t0
            if r >= args.warmup:
                times[name].append(dt * 1e3)
        print(
            f"round {r}: " + ", ".join(f"{n}={t[-1]:.1f} ms" for n, t in times.items() if t),
            flush=True,
        )

    # Same inputs, same number of steps: the results must agree (a wrong kernel is not fast).
    ref = contenders["torch.optim.AdamW(foreach=True)"][1]
    agreement = {}
    for name, (_, ps) in contenders.items():
        err = max(
            float((p.detach() - q.detach()).abs().max() / q.detach().abs().max())
            for p, q in zip(ps, ref)
        )
        agreement[name] = err

    med = {n: statistics.median(t) for n, t in times.items()}
    base = med["ds_kernels.CPUAdam"]
    device = f"{slug(cpu_model())}-{threads}t"
    result = {
        "scenario": "cpu-adam",
        "device": device,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "params": n_total,
        "tensors": args.tensors,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "bytes_per_param": 28,
        "median_ms": med,
        "min_ms": {n: min(t) for n, t in times.items()},
        "all_ms": times,
        "speedup_of_ds_kernels_over": {n: med[n] / base for n in med if n != "ds_kernels.CPUAdam"},
        "effective_gb_per_s": {n: 28 * n_total / (m * 1e-3) / 1e9 for n, m in med.items()},
        "copy_gb_per_s_measured": copy_gbps,
        "roofline_ms_at_copy_bw": 28 * n_total / copy_gbps / 1e6,
        "fraction_of_copy_bw": {
            n: 28 * n_total / (m * 1e-3) / 1e9 / copy_gbps for n, m in med.items()
        },
        "max_rel_diff_vs_torch": agreement,
        "skipped": skipped,
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "ds_kernels": ds_kernels.__version__,
            "deepspeed": ds_version,
        },
        "ds_kernels_backend": ours.backend,
        "ds_kernels_isa": getattr(ours._op, "isa", None),
        "load_average_at_end": os.getloadavg(),
        "date": datetime.date.today().isoformat(),
    }
    tables = ("median_ms", "min_ms", "all_ms", "effective_gb_per_s", "fraction_of_copy_bw",
              "max_rel_diff_vs_torch")  # fmt: skip
    columns = {("step_ms" if k == "median_ms" else k): result.pop(k) for k in tables}
    speedups = result.pop("speedup_of_ds_kernels_over")
    out = write_results(
        path=args.out_dir / f"cpu-adam-{device}-{datetime.date.today():%Y%m%d}.json",
        metric="step_ms",
        runs=runs_from_columns(columns),
        ratios={f"ds_kernels.CPUAdam/{n} step_ms": v for n, v in speedups.items()},
        **result,
    )
    print(json.dumps({"device": device, "step_ms": columns["step_ms"], "speedups": speedups,
                      "max_rel_diff_vs_torch": columns["max_rel_diff_vs_torch"],
                      "skipped": skipped}, indent=2))  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
