"""Run a ZeRO scenario with this project and its peers in one session, side by side.

    python benchmarks/zero/run.py zero3            # ds-zero stage 3, PyTorch FSDP2, DeepSpeed ZeRO-3
    python benchmarks/zero/run.py zero1 zero2 zero3 --nproc 2 --steps 20

Scenarios (the 1.34B GPT: d=2048, 24 layers, vocab 32768, seq 1024,
micro-batch 8 per GPU, bf16, AdamW, clip 1.0):
  zero1: ds-zero stage 1, PyTorch DDP (autocast bf16), DeepSpeed ZeRO-1
  zero2: ds-zero stage 2, PyTorch DDP, DeepSpeed ZeRO-2
  zero3: ds-zero stage 3, PyTorch FSDP2 (bf16 params, fp32 reduce), DeepSpeed ZeRO-3
Every run is a ``torchrun --nproc_per_node N`` subprocess (peers from the peers folder are run,
not copied). Writes benchmarks/results/<scenario>-<device>-<yyyymmdd>.json in the shared results
schema (benchmarks/_results.py) plus a PNG chart beside it, and copies both under $OUT when that is set. A peer that
cannot run (DeepSpeed not installed) is recorded with the reason instead of numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the shared results writer
from _results import write_results  # noqa: E402

SCENARIOS = {
    "zero1": [
        ("ds-zero-z1", "ours", ["--stage", "1"]),
        ("ddp", "fsdp", ["ddp"]),
        ("deepspeed-z1", "ds", ["1"]),
    ],
    "zero2": [
        ("ds-zero-z2", "ours", ["--stage", "2"]),
        ("ddp", "fsdp", ["ddp"]),
        ("deepspeed-z2", "ds", ["2"]),
    ],
    "zero3": [
        ("ds-zero-z3", "ours", ["--stage", "3"]),
        ("fsdp2", "fsdp", ["fsdp2"]),
        ("deepspeed-z3", "ds", ["3"]),
    ],
}


def peers_dir(arg: Path | None) -> Path:
    for cand in (
        arg,
        os.environ.get("DS_PEERS_DIR"),
        ROOT / "shared" / "peers",
        ROOT.parent / "shared" / "peers",
    ):
        if cand and (Path(cand) / "tinygpt.py").exists():
            return Path(cand)
    raise SystemExit(
        "run.py: cannot find the peers folder (tinygpt.py); pass --peers-dir or set DS_PEERS_DIR"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for_runs() -> dict[str, str]:
    env = dict(os.environ)
    srcs = [str(p) for p in sorted((ROOT / "packages").glob("*/src"))]
    env["PYTHONPATH"] = os.pathsep.join(srcs + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # DeepSpeed's op builder cannot parse the default "9.0a" arch of the H200 machine
    env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    return env


def has_deepspeed(env: dict[str, str]) -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", "import deepspeed"], env=env, capture_output=True, timeout=300
    )
    return probe.returncode == 0


def command(kind: str, extra: list[str], args: argparse.Namespace, peers: Path) -> list[str]:
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(args.nproc),
        "--master_port",
        str(free_port()),
    ]
    shape = [str(args.steps), str(args.dim), str(args.layers), str(args.batch)]
    if kind == "ours":
        return launch + [
            str(HERE / "bench.py"),
            *extra,
            "--steps",
            str(args.steps),
            "--dim",
            str(args.dim),
            "--layers",
            str(args.layers),
            "--batch",
            str(args.batch),
            "--peers-dir",
            str(peers),
            "--device",
            args.device,
        ]
    if kind == "fsdp":
        return launch + [str(peers / "fsdp2_peer_train.py"), extra[0], *shape]
    return launch + [str(peers / "ds_peer_gpu.py"), extra[0], *shape]


def run_one(system: str, cmd: list[str], env: dict[str, str], timeout: int, log: Path) -> dict:
    print(f"[run.py] {system}: {' '.join(cmd)}", flush=True)
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"system": system, "error": f"timed out after {timeout} s", "peak_mem_gb": None}
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(proc.stdout + "\n----- stderr -----\n" + proc.stderr)
    for line in reversed(proc.stdout.splitlines()):
        line = line.strip()
        if line.startswith("{") and '"step_s"' in line:
            r = json.loads(line)
            return {
                "system": system,
                "step_s": r["step_s"],
                "tokens_per_s": r.get("tok_s"),
                "peak_mem_gb": r.get("peak_gb"),
                "tflops_per_gpu": r.get("tflops_per_gpu"),
                "loss": r.get("loss"),
                "world": r.get("world"),
                "params_M": r.get("params_M"),
            }
    tail = (proc.stdout + proc.stderr)[-3000:]
    print(tail, file=sys.stderr)
    return {"system": system, "error": f"exit code {proc.returncode}", "log_tail": tail[-800:],
            "peak_mem_gb": None}  # fmt: skip


def device_name(nproc: int) -> tuple[str, str]:
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
    else:
        name = "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")
    return f"{nproc} x {name}", f"{nproc}x{slug}"


def ratios(runs: list[dict]) -> dict[str, float]:
    ours = [r for r in runs if r["system"].startswith("ds-zero") and "tokens_per_s" in r]
    out = {}
    for o in ours:
        for p in runs:
            if p is not o and "tokens_per_s" in p and not p["system"].startswith("ds-zero"):
                out[f"{o['system']}/{p['system']} tokens_per_s"] = round(
                    o["tokens_per_s"] / p["tokens_per_s"], 3
                )
                if o["peak_mem_gb"] and p["peak_mem_gb"]:  # None: not measured (CPU)
                    out[f"{o['system']}/{p['system']} peak_mem_gb"] = round(
                        o["peak_mem_gb"] / p["peak_mem_gb"], 3
                    )
    return out


def chart(result: dict, png: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"[run.py] matplotlib missing: render later with python {HERE / 'chart.py'} <json>")
        return False
    runs = [r for r in result["runs"] if "tokens_per_s" in r]
    names = [r["system"] for r in runs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    colors = ["tab:green" if n.startswith("ds-zero") else "tab:gray" for n in names]
    a.bar(names, [r["tokens_per_s"] for r in runs], color=colors)
    a.set_title("tokens/s (higher is better)")
    b.bar(names, [r["peak_mem_gb"] or 0 for r in runs], color=colors)  # None: not measured
    b.set_title("peak GPU memory GB (lower is better)")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"{result['scenario']} on {result['device']} ({result['date']})")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("scenarios", nargs="+", choices=sorted(SCENARIOS))
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--peers-dir", type=Path, default=None)
    ap.add_argument("--no-peers", action="store_true", help="run only ds-zero")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: smoke test")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    peers = peers_dir(args.peers_dir)
    env = env_for_runs()
    ds_ok = None
    device, slug = device_name(args.nproc)
    date = datetime.date.today()
    for scenario in args.scenarios:
        runs = []
        for system, kind, extra in SCENARIOS[scenario]:
            if args.no_peers and kind != "ours":
                continue
            if kind == "ds":
                ds_ok = has_deepspeed(env) if ds_ok is None else ds_ok
                if not ds_ok:
                    runs.append({"system": system, "skipped": "deepspeed is not installed",
                                 "peak_mem_gb": None})  # fmt: skip
                    continue
            log = args.out_dir / "logs" / f"{scenario}-{slug}-{system}.log"
            runs.append(run_one(system, command(kind, extra, args, peers), env, args.timeout, log))
            print(f"[run.py] {json.dumps(runs[-1])}", flush=True)
        result = {
            "scenario": scenario,
            "device": device,
            "date": date.isoformat(),
            "config": {
                "dim": args.dim,
                "layers": args.layers,
                "vocab": 32768,
                "seq": 1024,
                "micro_batch": args.batch,
                "nproc": args.nproc,
                "steps": args.steps,
                "timed_steps": args.steps - 3,
                "dtype": "bf16",
                "optimizer": "AdamW",
                "clip": 1.0,
            },
            "runs": runs,
            "ratios": ratios(runs),
        }
        args.out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{scenario}-{slug}-{date.strftime('%Y%m%d')}"
        path = write_results(path=args.out_dir / f"{stem}.json", copy_to_out=False, **result)
        png = args.out_dir / f"{stem}.png"
        drawn = chart(result, png)
        print(f"[run.py] wrote {path}" + (f" and {png}" if drawn else ""))
        out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
        # --out-dir may already be $OUT: copying a file onto itself raises SameFileError
        if out is not None and out.resolve() != args.out_dir.resolve():
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, out / path.name)
            if drawn:
                shutil.copy(png, out / png.name)


if __name__ == "__main__":
    main()
