"""CPU Adam step: ds_kernels.CPUAdam vs torch.optim.AdamW(foreach=True) vs DeepSpeedCPUAdam.

Same process, same thread count, same parameters and gradients; the contenders are timed in
interleaved rounds (one step of each per round) so that load from other processes hits all
of them alike. Writes benchmarks/results/cpu-adam-<device>-<yyyymmdd>.json with per-step
times and the ratios against CPUAdam.

    python benchmarks/kernels/cpu_adam_bench.py                 # 200M params, all cores
    python benchmarks/kernels/cpu_adam_bench.py --params 50e6 --threads 2

ZeRO-Offload's case, bf16 gradients from the device and the bf16 copy of the result for the
host-to-device copy (cpu-adam-bf16-grads-<device>-<yyyymmdd>.json):

    python benchmarks/kernels/cpu_adam_bench.py --grad-dtype bf16 --low-precision-out bf16

With 16-bit gradients CPUAdam reads them directly (widened inside its one pass); the
contender "ds_kernels.CPUAdam upcast-first" is what CPUAdam did before ds-kernels 0.1.6 (and
what every optimizer that needs fp32 gradients does): `grad.float()` into a new tensor per
step, timed, then the fp32 step. The others (torch, DeepSpeed: both read gradients in the
param's dtype) also step on `grad.float()`, timed. A run "fp32 grads given" steps on fp32
gradients made before the timing: the floor that the direct read should reach.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared results writer
from _results import runs_from_columns, write_results  # noqa: E402

MAIN = "ds_kernels.CPUAdam"


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--params", type=float, default=200e6, help="total parameters (default 200M)")
    ap.add_argument("--tensors", type=int, default=8, help="split into this many tensors")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (one step each)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="threads for all (0: all cores)")
    ap.add_argument("--no-deepspeed", action="store_true")
    ap.add_argument("--no-torch", action="store_true", help="leave torch.optim.AdamW out")
    ap.add_argument(
        "--grad-dtype", choices=sorted(DTYPES), default="fp32", help="gradient dtype (fp32)"
    )
    ap.add_argument(
        "--low-precision-out",
        choices=["none", "bf16", "fp16"],
        default="none",
        help="also write the updated params in this dtype, as offload does (none)",
    )
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
    grad_dtype = getattr(torch, DTYPES[args.grad_dtype])
    low_grads = grad_dtype != torch.float32
    out_dtype = (
        None if args.low_precision_out == "none" else getattr(torch, DTYPES[args.low_precision_out])
    )

    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(n, generator=gen) for n in sizes]
    # shared, read-only for every contender
    grads = [(torch.randn(n, generator=gen) * 1e-2).to(grad_dtype) for n in sizes]

    def fresh_params(direct: bool) -> list[torch.nn.Parameter]:
        """Params whose .grad is the shared gradient (direct), or None: filled per step."""
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        if direct:
            for p, g in zip(ps, grads):
                if g.dtype == p.dtype:
                    p.grad = g
                elif hasattr(p, "grad_dtype"):
                    p.grad_dtype = g.dtype  # torch >= 2.9 checks it on assignment
                    p.grad = g
                else:  # older torch: .data takes another dtype
                    p.grad = torch.zeros_like(p)
                    p.grad.data = g
        return ps

    def outs_for(ps: list[torch.nn.Parameter]) -> list[torch.Tensor] | None:
        return None if out_dtype is None else [torch.empty_like(p, dtype=out_dtype) for p in ps]

    def ds_step(opt, outs) -> Callable[[], None]:
        return lambda: opt.step(low_precision_out=None if outs is None else [outs])

    def upcast_first(opt, ps, outs, step=None) -> Callable[[], None]:
        """What an optimizer that reads fp32 gradients costs: `grad.float()` per step (a new
        tensor, as CPUAdam's upcast did until 0.1.6), the step, the copy out, and the free."""

        def run() -> None:
            for p, g in zip(ps, grads):
                p.grad = g.float()
            (step or opt.step)()
            if outs is not None and step is None:
                for o, p in zip(outs, ps):
                    o.copy_(p.detach())
            for p in ps:
                p.grad = None

        return run

    def torch_step(opt, ps, outs) -> Callable[[], None]:
        def run() -> None:
            opt.step()
            if outs is not None:
                for o, p in zip(outs, ps):
                    o.copy_(p.detach())

        return run

    # name -> (the timed step, its params, its low-precision outputs, traffic per param)
    contenders: dict[str, tuple[Callable[[], None], list[torch.nn.Parameter], Any, int]] = {}
    skipped: dict[str, str] = {}
    gb, ob = grad_dtype.itemsize, (out_dtype.itemsize if out_dtype is not None else 0)
    # read p, m, v, g and write p, m, v (and the copy); an upcast first reads g and writes it
    # as fp32, which the step then reads at 4 bytes
    direct_bytes, upcast_bytes = 24 + gb + ob, 24 + gb + 4 + 4 + ob
    ps = fresh_params(direct=True)
    ours = ds_kernels.CPUAdam(ps, num_threads=threads, **kw)
    outs = outs_for(ps)
    contenders[MAIN] = (ds_step(ours, outs), ps, outs, direct_bytes)
    if low_grads:
        ps = fresh_params(direct=False)
        old = ds_kernels.CPUAdam(ps, num_threads=threads, **kw)
        outs = outs_for(ps)
        contenders[MAIN + " upcast-first"] = (
            upcast_first(old, ps, outs, ds_step(old, outs)), ps, outs, upcast_bytes,
        )  # fmt: skip
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        for p, g in zip(ps, grads):
            p.grad = g.float()  # made once, outside the timing
        floor = ds_kernels.CPUAdam(ps, num_threads=threads, **kw)
        outs = outs_for(ps)
        contenders[MAIN + " fp32 grads given"] = (ds_step(floor, outs), ps, outs, 28 + ob)
    torch_name = "torch.optim.AdamW(foreach=True)" + (" on grad.float()" if low_grads else "")
    if args.no_torch:
        skipped[torch_name] = "--no-torch"
    else:
        ps = fresh_params(direct=not low_grads)
        opt = torch.optim.AdamW(ps, foreach=True, **kw)
        outs = outs_for(ps)
        run = upcast_first(opt, ps, outs) if low_grads else torch_step(opt, ps, outs)
        contenders[torch_name] = (run, ps, outs, upcast_bytes if low_grads else 28 + ob)
    ds_version = None
    ds_name = "deepspeed.DeepSpeedCPUAdam" + (" on grad.float()" if low_grads else "")
    if args.no_deepspeed:
        skipped[ds_name] = "--no-deepspeed"
    else:
        try:
            import deepspeed
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            ds_version = deepspeed.__version__
            ps = fresh_params(direct=not low_grads)
            ds_opt = DeepSpeedCPUAdam(ps, adamw_mode=True, **kw)
            outs = outs_for(ps)
            run = upcast_first(ds_opt, ps, outs) if low_grads else torch_step(ds_opt, ps, outs)
            contenders[ds_name] = (run, ps, outs, upcast_bytes if low_grads else 28 + ob)
        except Exception as exc:  # noqa: BLE001 - optional peer
            skipped[ds_name] = f"{type(exc).__name__}: {exc}"[:300]

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
        for name, (step, *_) in contenders.items():
            t0 = time.perf_counter()
            step()
            dt = time.perf_counter() - t0
            if r >= args.warmup:
                times[name].append(dt * 1e3)
        print(
            f"round {r}: " + ", ".join(f"{n}={t[-1]:.1f} ms" for n, t in times.items() if t),
            flush=True,
        )

    # Same inputs, same number of steps: the results must agree (a wrong kernel is not fast);
    # the ds_kernels runs must agree bit for bit with each other (same fp32 arithmetic)
    agreement: dict[str, float | None] = {}
    for name, (_, ps, *_) in contenders.items():
        if torch_name not in contenders:
            agreement[name] = None  # --no-torch: nothing to compare with
            continue
        ref = contenders[torch_name][1]
        agreement[name] = max(
            float((p.detach() - q.detach()).abs().max() / q.detach().abs().max())
            for p, q in zip(ps, ref)
        )
    main_ps, main_outs = contenders[MAIN][1], contenders[MAIN][2]
    bitwise = {}
    for name, (_, ps, outs, _) in contenders.items():
        if name.startswith(MAIN) and name != MAIN:
            same = all(torch.equal(p, q) for p, q in zip(ps, main_ps))
            if outs is not None:
                same = same and all(torch.equal(a, b) for a, b in zip(outs, main_outs))
            bitwise[name] = same
    if not all(bitwise.values()):
        raise SystemExit(f"ds_kernels runs disagree bitwise: {bitwise}")

    med = {n: statistics.median(t) for n, t in times.items()}
    base = med[MAIN]
    traffic = {n: c[3] for n, c in contenders.items()}
    device = f"{slug(cpu_model())}-{threads}t"
    scenario = "cpu-adam" + (f"-{args.grad_dtype}-grads" if low_grads else "")
    result = {
        "scenario": scenario,
        "device": device,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "params": n_total,
        "tensors": args.tensors,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "grad_dtype": args.grad_dtype,
        "low_precision_out": args.low_precision_out,
        "bitwise_equal_to_ds_kernels_CPUAdam": bitwise,
        "median_ms": med,
        "min_ms": {n: min(t) for n, t in times.items()},
        "all_ms": times,
        "speedup_of_ds_kernels_over": {n: med[n] / base for n in med if n != MAIN},
        "bytes_per_param": traffic,
        "effective_gb_per_s": {n: traffic[n] * n_total / (m * 1e-3) / 1e9 for n, m in med.items()},
        "copy_gb_per_s_measured": copy_gbps,
        "roofline_ms_at_copy_bw": traffic[MAIN] * n_total / copy_gbps / 1e6,
        "fraction_of_copy_bw": {
            n: traffic[n] * n_total / (m * 1e-3) / 1e9 / copy_gbps for n, m in med.items()
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
    tables = ("median_ms", "min_ms", "all_ms", "bytes_per_param", "effective_gb_per_s",
              "fraction_of_copy_bw", "max_rel_diff_vs_torch")  # fmt: skip
    columns = {("step_ms" if k == "median_ms" else k): result.pop(k) for k in tables}
    speedups = result.pop("speedup_of_ds_kernels_over")
    out = write_results(
        path=args.out_dir / f"{scenario}-{device}-{datetime.date.today():%Y%m%d}.json",
        metric="step_ms",
        runs=runs_from_columns(columns),
        ratios={f"{MAIN}/{n} step_ms": v for n, v in speedups.items()},
        **result,
    )
    print(json.dumps({"device": device, "step_ms": columns["step_ms"], "speedups": speedups,
                      "max_rel_diff_vs_torch": columns["max_rel_diff_vs_torch"],
                      "skipped": skipped}, indent=2))  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
