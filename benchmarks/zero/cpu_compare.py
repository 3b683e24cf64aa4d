"""CPU side-by-side: ds-zero stages 0-3 vs DeepSpeed 0.19.8 (the peer ds_peer_train.py) with gloo,
the CPU model (GPT d=256, 4 layers, 4 heads, vocab 1024, seq 128,
micro-batch 8, fp32, AdamW lr 1e-3, clip 1.0), 2 ranks, alternating runs in one session:

    python benchmarks/zero/cpu_compare.py --steps 30

Writes benchmarks/results/zero-cpu-<nproc>xcpu-<yyyymmdd>.json (and a copy under $OUT if set), in
the shared results schema (benchmarks/_results.py).
Step times are only comparable within one run of this script (shared cores, ratios only).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared results writer
from _results import write_results  # noqa: E402
from run import HERE, ROOT, env_for_runs, free_port, has_deepspeed, peers_dir, run_one  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--stages", default="0,1,2,3")
    ap.add_argument("--peers-dir", type=Path, default=None)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    peers = peers_dir(args.peers_dir)
    env = env_for_runs()
    env["DS_ACCELERATOR"] = "cpu"
    ds_ok = has_deepspeed(env)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc)]
    runs = []
    tokens = 8 * 128 * args.nproc
    logs = args.out_dir / "logs"
    for stage in [int(s) for s in args.stages.split(",")]:
        ours = [
            *launch, "--master_port", str(free_port()), str(HERE / "bench.py"),
            "--stage", str(stage), "--steps", str(args.steps), "--dim", "256", "--layers", "4",
            "--heads", "4", "--vocab", "1024", "--seq", "128", "--batch", "8", "--dtype", "fp32",
            "--lr", "1e-3", "--device", "cpu", "--peers-dir", str(peers),
        ]  # fmt: skip
        pair = [(f"ds-zero-z{stage}", ours)]
        if ds_ok:
            peer = [
                *launch, "--master_port", str(free_port()), str(peers / "ds_peer_train.py"),
                str(stage), str(args.steps), "256", "4",
            ]  # fmt: skip
            pair.append((f"deepspeed-z{stage}", peer))
        for system, cmd in pair:
            r = run_one(system, cmd, env, 1800, logs / f"zero-cpu-{system}.log")
            if "step_s" in r:
                r["tokens_per_s"] = round(tokens / r["step_s"])
                r["step_s"] = round(r["step_s"], 4)
            runs.append(r)
            print(json.dumps(r), flush=True)
    ratios = {}
    for r in runs:
        if r["system"].startswith("deepspeed") and "step_s" in r:
            mine = next(
                o for o in runs if o["system"] == r["system"].replace("deepspeed", "ds-zero")
            )
            if "step_s" in mine:
                ratios[f"{mine['system']} speed vs {r['system']}"] = round(
                    r["step_s"] / mine["step_s"], 3
                )
    date = datetime.date.today()
    result = {
        "scenario": "zero-cpu",
        "device": f"{args.nproc} x cpu (gloo, shared 2-core machine)",
        "date": date.isoformat(),
        "config": {"dim": 256, "layers": 4, "heads": 4, "vocab": 1024, "seq": 128,
                   "micro_batch": 8, "dtype": "fp32", "optimizer": "AdamW lr 1e-3",
                   "clip": 1.0, "steps": args.steps},
        "deepspeed": "not installed" if not ds_ok else "installed",
        "runs": runs,
        "ratios": ratios,
    }  # fmt: skip
    path = write_results(
        path=args.out_dir / f"zero-cpu-{args.nproc}xcpu-{date.strftime('%Y%m%d')}.json", **result
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
