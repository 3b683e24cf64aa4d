"""GPU Adam step over 1B fp32 params: ds_kernels.FusedAdam (Triton) vs torch.optim.AdamW(fused=True)
vs DeepSpeed FusedAdam, in one process, timed with CUDA events in interleaved rounds.

Roofline: an fp32 Adam step must read p, g, m, v and write p, m, v = 28 bytes per param. The
achievable HBM bandwidth is measured in the same run (a device-to-device copy), and the peak
from the spec sheet is used where the GPU is known.

    PYTHONPATH=$(ls -d packages/*/src | tr '\\n' ':') python benchmarks/kernels/fused_adam_bench.py

Writes benchmarks/results/fused-adam-<gpu>-<yyyymmdd>.json (and a copy under $OUT if set).
DeepSpeed's FusedAdam is timed when `deepspeed` imports and its op builds (nvcc needed); on an
H200 with torch 2.11 set TORCH_CUDA_ARCH_LIST=9.0, or DeepSpeed's arch parsing fails on "9.0a".
"""

from __future__ import annotations

import argparse
import datetime
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared results writer
from _results import runs_from_columns, write_results  # noqa: E402

# Spec-sheet HBM bandwidth (TB/s), for the "% of peak" column.
PEAK_TBPS = {"H200": 4.8, "H100 80GB HBM3": 3.35, "H100 SXM": 3.35, "H100 PCIe": 2.0, "A100": 2.0}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--params", type=float, default=1e9)
    ap.add_argument("--tensors", type=int, default=16)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-deepspeed", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="also time Triton launch configurations")
    ap.add_argument(
        "--bf16-master", action="store_true", help="also time bf16 params + fp32 master"
    )
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parents[1] / "results")
    return ap.parse_args()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def main() -> int:
    args = parse_args()
    import torch

    import ds_kernels
    from ds_kernels import _fused_triton

    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    n_total = int(args.params)
    sizes = [n_total // args.tensors] * args.tensors
    sizes[-1] += n_total - sum(sizes)
    kw = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    gen = torch.Generator(device=dev).manual_seed(0)
    grads = [torch.randn(n, device=dev, generator=gen) * 1e-2 for n in sizes]

    def fresh(dtype=torch.float32):
        g2 = torch.Generator(device=dev).manual_seed(1)
        ps = [torch.nn.Parameter(torch.randn(n, device=dev, generator=g2).to(dtype)) for n in sizes]
        for p, g in zip(ps, grads):
            p.grad = g if dtype == torch.float32 else g.to(dtype)
        return ps

    def time_steps(opts: dict, iters: int, warmup: int) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {k: [] for k in opts}
        for i in range(warmup + iters):
            for k, opt in opts.items():
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                opt.step()
                e.record()
                if i >= warmup:
                    out[k].append((s, e))
        torch.cuda.synchronize()
        return {k: [s.elapsed_time(e) for s, e in v] for k, v in out.items()}

    # Achievable bandwidth: copy 2 GiB (read + write) a few times.
    a = torch.empty(512 * 2**20, device=dev)
    b = torch.empty_like(a)
    copy_ms = []
    for i in range(15):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        if i >= 5:
            copy_ms.append(s.elapsed_time(e))
    copy_tbps = 2 * a.numel() * 4 / (statistics.median(copy_ms) * 1e-3) / 1e12
    del a, b

    sweep = {}
    if args.sweep:
        default = (_fused_triton.BLOCK, _fused_triton.ITERS, _fused_triton.NUM_WARPS)
        for block, iters_, warps in [
            (1024, 4, 4), (2048, 4, 8), (2048, 8, 8), (1024, 8, 4), (2048, 4, 4), (1024, 4, 8),
            (4096, 2, 8), (512, 8, 4),
        ]:  # fmt: skip
            _fused_triton.BLOCK, _fused_triton.ITERS, _fused_triton.NUM_WARPS = block, iters_, warps
            _fused_triton.CHUNK = block * iters_
            ps = fresh()
            t = time_steps({"ours": ds_kernels.FusedAdam(ps, **kw)}, 10, 3)["ours"]
            sweep[f"BLOCK={block},ITERS={iters_},warps={warps}"] = statistics.median(t)
            print("sweep", block, iters_, warps, f"{statistics.median(t):.3f} ms", flush=True)
            del ps
            torch.cuda.empty_cache()
        _fused_triton.BLOCK, _fused_triton.ITERS, _fused_triton.NUM_WARPS = default
        _fused_triton.CHUNK = default[0] * default[1]

    opts: dict[str, torch.optim.Optimizer] = {}
    params: dict[str, list] = {}
    skipped: dict[str, str] = {}
    params["ds_kernels.FusedAdam"] = fresh()
    opts["ds_kernels.FusedAdam"] = ds_kernels.FusedAdam(params["ds_kernels.FusedAdam"], **kw)
    params["torch.optim.AdamW(fused=True)"] = fresh()
    opts["torch.optim.AdamW(fused=True)"] = torch.optim.AdamW(
        params["torch.optim.AdamW(fused=True)"], fused=True, **kw
    )
    ds_version = None
    if args.no_deepspeed:
        skipped["deepspeed.FusedAdam"] = "--no-deepspeed"
    else:
        try:
            import deepspeed
            from deepspeed.ops.adam import FusedAdam as DSFusedAdam

            ds_version = deepspeed.__version__
            ps = fresh()
            opts["deepspeed.FusedAdam"] = DSFusedAdam(ps, adam_w_mode=True, **kw)
            params["deepspeed.FusedAdam"] = ps
        except Exception as exc:  # noqa: BLE001 - optional peer (needs nvcc to JIT-build)
            skipped["deepspeed.FusedAdam"] = f"{type(exc).__name__}: {exc}"[:300]
    if args.bf16_master:
        ps = fresh(torch.bfloat16)
        opts["ds_kernels.FusedAdam(bf16+fp32 master)"] = ds_kernels.FusedAdam(
            ps, master_weights=True, **kw
        )
        params["ds_kernels.FusedAdam(bf16+fp32 master)"] = ps

    times = time_steps(opts, args.iters, args.warmup)
    med = {k: statistics.median(v) for k, v in times.items()}
    ours = med["ds_kernels.FusedAdam"]
    ref = params["torch.optim.AdamW(fused=True)"]
    agreement = {
        k: max(
            float((p.detach().float() - q.detach()).abs().max() / q.detach().abs().max())
            for p, q in zip(ps, ref)
        )
        for k, ps in params.items()
    }
    bytes_moved = 28 * n_total
    peak = next((v for k, v in PEAK_TBPS.items() if k in name), None)
    result = {
        "scenario": "fused-adam",
        "device": name,
        "params": n_total,
        "tensors": args.tensors,
        "iters": args.iters,
        "median_ms": med,
        "min_ms": {k: min(v) for k, v in times.items()},
        "speedup_of_ds_kernels_over": {
            k: med[k] / ours for k in med if k != "ds_kernels.FusedAdam"
        },
        "achieved_tbps": {k: bytes_moved / (m * 1e-3) / 1e12 for k, m in med.items()},
        "copy_tbps_measured": copy_tbps,
        "roofline_ms_at_copy_bw": bytes_moved / (copy_tbps * 1e12) * 1e3,
        "fraction_of_copy_bw": {
            k: bytes_moved / (m * 1e-3) / 1e12 / copy_tbps for k, m in med.items()
        },
        "spec_peak_tbps": peak,
        "fraction_of_spec_peak": (
            {k: bytes_moved / (m * 1e-3) / 1e12 / peak for k, m in med.items()} if peak else None
        ),
        "max_rel_diff_vs_torch_fused": agreement,
        "triton_config": {
            "BLOCK": _fused_triton.BLOCK,
            "ITERS": _fused_triton.ITERS,
            "NUM_WARPS": _fused_triton.NUM_WARPS,
        },  # fmt: skip
        "sweep_ms": sweep,
        "skipped": skipped,
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "triton": __import__("triton").__version__,
            "deepspeed": ds_version,
            "ds_kernels": ds_kernels.__version__,
        },
        "backend": opts["ds_kernels.FusedAdam"].backend,
        "date": datetime.date.today().isoformat(),
    }
    tables = ("median_ms", "min_ms", "achieved_tbps", "fraction_of_copy_bw",
              "fraction_of_spec_peak", "max_rel_diff_vs_torch_fused")  # fmt: skip
    columns = {("step_ms" if k == "median_ms" else k): result.pop(k) for k in tables}
    columns = {k: v for k, v in columns.items() if v is not None}
    speedups = result.pop("speedup_of_ds_kernels_over")
    fname = f"fused-adam-{slug(name)}-{datetime.date.today():%Y%m%d}.json"
    out = write_results(
        path=args.out_dir / fname,
        metric="step_ms",
        runs=runs_from_columns(columns),
        ratios={f"ds_kernels.FusedAdam/{n} step_ms": v for n, v in speedups.items()},
        **result,
    )
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
