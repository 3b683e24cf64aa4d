"""Weak scaling of ZeRO-3: ds-zero, PyTorch FSDP2 and DeepSpeed ZeRO-3 on 2, 4 and 8 GPUs of one
host, for the 1.34B GPT (d=2048, 24 layers) and a model about 4x larger, in one session.

    python benchmarks/scaling/run_scaling.py                       # every GPU count that fits
    python benchmarks/scaling/run_scaling.py --gpus 2,4 --models 1.3b --steps 15
    python benchmarks/scaling/run_scaling.py --device cpu --gpus 2 --models tiny --steps 4  # smoke

Each point is one ``benchmarks/zero/run.py zero3 --nproc N`` (micro-batch fixed per GPU, so the
work per GPU is constant: weak scaling). Writes
benchmarks/results/scaling-zero3-<device>-<yyyymmdd>.json (the shared results schema,
benchmarks/_results.py: one run per system, model and GPU count) with, per model, system and GPU count,
tokens/s per GPU and the weak-scaling efficiency (tokens/s per GPU at N over that at the
smallest N measured), the ratios against FSDP2 and DeepSpeed at every point, and a PNG chart;
copies both under $OUT when set. GPU counts above the devices present are skipped and listed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the shared results writer
from _results import write_results  # noqa: E402

# name -> (dim, layers): 1.3b is the 1.34B GPT (d=2048, 24 layers); 5b has d=4096 and 26 layers, 5.5B params
# (4.1x); tiny is for CPU smoke runs
MODELS = {"1.3b": (2048, 24), "5b": (4096, 26), "tiny": (64, 2)}
GOALS = {"vs_fsdp2": 1.0, "efficiency_2_to_8": 0.9}


def params_of(dim: int, layers: int, vocab: int = 32768, seq: int = 1024) -> int:
    """Parameters of tinygpt's GPT (blocks of attention + 4x MLP, embeddings, untied head)."""
    block = 12 * dim * dim + 13 * dim
    return layers * block + (2 * vocab + seq) * dim + 2 * dim


def device_count(device: str) -> int:
    if device == "cpu":
        return os.cpu_count() or 1
    import torch

    return torch.cuda.device_count()


def run_point(model: str, nproc: int, args: argparse.Namespace, scratch: Path) -> dict:
    dim, layers = MODELS[model]
    out = scratch / f"{model}-n{nproc}"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "zero" / "run.py"), "zero3",
           "--nproc", str(nproc), "--steps", str(args.steps), "--dim", str(dim),
           "--layers", str(layers), "--batch", str(args.batch), "--device", args.device,
           "--timeout", str(args.timeout), "--out-dir", str(out)]  # fmt: skip
    if args.peers_dir:
        cmd += ["--peers-dir", str(args.peers_dir)]
    env = dict(os.environ)
    env.pop("OUT", None)  # run.py would copy every point's files there; we copy the summary
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=False)
    found = sorted(out.glob("zero3-*.json"))
    if not found:
        return {"model": model, "nproc": nproc, "error": "run.py wrote no result"}
    result = json.loads(found[-1].read_text())
    logs = out / "logs"
    if logs.is_dir():  # keep the per-run logs next to the summary
        dest = args.out_dir / "logs"
        dest.mkdir(parents=True, exist_ok=True)
        for f in logs.iterdir():
            shutil.copy(f, dest / f"scaling-{model}-n{nproc}-{f.name}")
    return {"model": model, "nproc": nproc, "device": result["device"], "runs": result["runs"]}


def summarize(points: list[dict]) -> dict:
    """Per model and system: tokens/s per GPU by GPU count, efficiency, ratios to the peers."""
    table: dict[str, dict[str, dict[int, float]]] = {}
    for pt in points:
        for run in pt.get("runs", []):
            if "tokens_per_s" in run:
                per_gpu = run["tokens_per_s"] / pt["nproc"]
                table.setdefault(pt["model"], {}).setdefault(run["system"], {})[pt["nproc"]] = (
                    per_gpu
                )
    out: dict = {}
    for model, systems in table.items():
        out[model] = {}
        for system, by_n in systems.items():
            base_n = min(by_n)
            out[model][system] = {
                "tokens_per_s_per_gpu": {str(n): round(v) for n, v in sorted(by_n.items())},
                "weak_scaling_efficiency": {
                    str(n): round(v / by_n[base_n], 3) for n, v in sorted(by_n.items())
                },
            }
        ours = systems.get("ds-zero-z3", {})
        for peer in ("fsdp2", "deepspeed-z3"):
            theirs = systems.get(peer, {})
            out[model][f"ds-zero-z3/{peer}"] = {
                str(n): round(ours[n] / theirs[n], 3) for n in sorted(ours) if n in theirs
            }
    return out


def chart(summary: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    models = list(summary)
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        for system, data in summary[model].items():
            if "/" in system:
                continue
            pts = sorted((int(n), v) for n, v in data["tokens_per_s_per_gpu"].items())
            ax.plot([n for n, _ in pts], [v for _, v in pts], marker="o", label=system)
        ax.set_title(f"ZeRO-3 weak scaling, GPT {model}")
        ax.set_xlabel("GPUs")
        ax.set_ylabel("tokens/s per GPU")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--gpus", default="2,4,8", help="comma list of GPU counts")
    ap.add_argument("--models", default="1.3b,5b", help=f"comma list of {sorted(MODELS)}")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--batch", type=int, default=8, help="micro-batch per GPU")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--peers-dir", type=Path, default=None)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    try:
        counts = sorted({int(n) for n in args.gpus.split(",") if n.strip()})
    except ValueError:
        sys.exit(f"--gpus: expected a comma list of integers such as 2,4,8, got {args.gpus!r}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not counts or min(counts) < 1:
        sys.exit(f"--models must name {sorted(MODELS)} and --gpus positive counts; got "
                 f"{args.models!r}, {args.gpus!r}")  # fmt: skip
    have = device_count(args.device)
    run_counts = [n for n in counts if n <= have]
    skipped = [n for n in counts if n > have]
    if not run_counts:
        sys.exit(f"no requested GPU count fits the {have} device(s) here: {counts}")
    scratch = Path(tempfile.mkdtemp(prefix="ds-scaling-"))
    points = [run_point(m, n, args, scratch) for m in models for n in run_counts]
    shutil.rmtree(scratch, ignore_errors=True)
    device = next((p["device"] for p in points if "device" in p), args.device)
    date = datetime.date.today()
    summary = summarize(points)
    runs = [
        {**run, "system": f"{run['system']} {pt['model']} x{pt['nproc']}", "model": pt["model"],
         "nproc": pt["nproc"]}
        for pt in points for run in pt.get("runs", [])
    ] + [
        {"system": f"{pt['model']} x{pt['nproc']}", "model": pt["model"], "nproc": pt["nproc"],
         "error": pt["error"], "peak_mem_gb": None}
        for pt in points if "error" in pt
    ]  # fmt: skip
    ratios = {
        f"{name} {model} x{n} tokens_per_s": v
        for model, table in summary.items()
        for name, by_n in table.items() if "/" in name
        for n, v in by_n.items()
    }  # fmt: skip
    result = {
        "scenario": "scaling-zero3",
        "device": device,
        "date": date.isoformat(),
        "config": {
            "models": {
                m: {"dim": MODELS[m][0], "layers": MODELS[m][1], "params": params_of(*MODELS[m])}
                for m in models
            },
            "micro_batch_per_gpu": args.batch,
            "seq": 1024,
            "steps": args.steps,
            "dtype": "bf16",
            "gpus": run_counts,
            "skipped_gpus": skipped,
        },  # fmt: skip
        "goals": GOALS,
        "summary": summary,
    }
    slug = f"{max(run_counts)}x{device.split(' x ')[-1].replace(' ', '-').lower()}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = write_results(
        path=args.out_dir / f"scaling-zero3-{slug}-{date:%Y%m%d}.json",
        copy_to_out=False,
        **result,
        runs=runs,
        ratios=ratios,
    )
    png = path.with_suffix(".png")
    drawn = chart(result["summary"], png)
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {path}" + (f" and {png}" if drawn else ""))
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, out / path.name)
        if drawn:
            shutil.copy(png, out / png.name)


if __name__ == "__main__":
    main()
