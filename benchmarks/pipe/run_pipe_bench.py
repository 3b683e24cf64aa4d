"""Side-by-side pipeline benchmark on one GPU host: ds-pipe configurations, DeepSpeed's pipeline
engine and torch.distributed.pipelining, in one session, written to one results JSON.

    python benchmarks/pipe/run_pipe_bench.py --out $OUT [--peers /work/shared/peers]

Every run is its own ``torchrun --nproc_per_node N`` (argv lists, no shell). Peers that cannot
start (e.g. DeepSpeed not installed) are recorded with their error instead of a number.
Writes ``$OUT/pipe-gpt1.3b-<device>-<yyyymmdd>.json`` and, when the repository's
``benchmarks/results`` directory exists, a copy there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))  # the shared results writer
from _results import write_results  # noqa: E402

# (tag, extra pipe_bench.py arguments)
OURS = [
    ("ds-pipe-1f1b-params", ["--schedule", "1f1b", "--partition", "parameters"]),
    ("ds-pipe-1f1b-balanced", ["--schedule", "1f1b", "--partition", "0,14,26"]),
    (
        "ds-pipe-interleaved2",
        ["--schedule", "interleaved_1f1b", "--chunks", "2", "--partition", "0,7,13,20,26"],
    ),
    (
        "ds-pipe-1f1b-autocast",
        ["--schedule", "1f1b", "--partition", "parameters", "--precision", "autocast"],
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, script: str, args: list[str], env: dict[str, str], timeout: int):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_port",
        str(free_port()),  # a fresh port per run: the previous one may linger in TIME_WAIT
        script,
        *args,
    ]
    print("+", " ".join(cmd), flush=True)
    # Own session, so a timeout can stop torchrun and every rank it started.
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return {"error": f"timed out after {timeout}s", "log_tail": (out + err)[-3000:]}
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}", "log_tail": (out + err)[-3000:]}
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--peers", default="/work/shared/peers")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=13)
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--only", default="", help="comma list of tags to run (default: all)")
    ap.add_argument(
        "--bench-args",
        default="",
        help="extra pipe_bench.py arguments, e.g. a CPU smoke run: "
        "'--device cpu --dim 128 --n-layers 4 --vocab 256 --seq 32' (with --only for ours)",
    )
    args = ap.parse_args()
    if not os.path.isdir(args.peers) and os.path.isdir(os.path.join(REPO, "shared", "peers")):
        args.peers = os.path.join(REPO, "shared", "peers")
    env = dict(os.environ)
    src = [
        os.path.join(REPO, "packages", p, "src")
        for p in sorted(os.listdir(os.path.join(REPO, "packages")))
    ]
    env["PYTHONPATH"] = os.pathsep.join(src + [env.get("PYTHONPATH", "")])
    env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")  # DeepSpeed's op builder rejects "9.0a"
    only = set(filter(None, args.only.split(",")))

    runs: dict[str, dict] = {}
    for tag, extra in OURS:
        if only and tag not in only:
            continue
        runs[tag] = torchrun(
            args.nproc,
            os.path.join(HERE, "pipe_bench.py"),
            [
                "--out",
                args.out,
                "--steps",
                str(args.steps),
                "--tag",
                tag,
                *extra,
                *shlex.split(args.bench_args),
            ],
            env,
            args.timeout,
        )
    peer_args = [str(args.steps), "2048", "24", "4", "8"]
    for tag, script in [
        ("deepspeed-pipe", "ds_pipe_bench.py"),
        ("torch-pipelining-1f1b", "torch_pipe_bench.py"),
    ]:
        if only and tag not in only:
            continue
        path = os.path.join(args.peers, script)
        if not os.path.exists(path):
            runs[tag] = {"error": f"peer script {path} not found (pass --peers DIR)"}
            continue
        runs[tag] = torchrun(args.nproc, path, peer_args, env, args.timeout)

    def step_s(r: dict) -> float | None:
        return r.get("step_s") if isinstance(r.get("step_s"), (int, float)) else None

    ratios = {}
    for peer in ("deepspeed-pipe", "torch-pipelining-1f1b"):
        ps = step_s(runs.get(peer, {}))
        for tag, r in runs.items():
            if ps and tag.startswith("ds-pipe") and step_s(r):
                ratios[f"{tag}/{peer} speed"] = round(ps / step_s(r), 3)
    import torch

    device = torch.cuda.get_device_name().replace(" ", "_") if torch.cuda.is_available() else "cpu"
    today = datetime.date.today()
    rows = []
    for tag, r in runs.items():
        row = {"system": tag, **{k: v for k, v in r.items() if k != "peer"}}
        if "tok_s" in row:  # the peers' scripts name it tok_s
            row["tokens_per_s"] = row.pop("tok_s")
        per_rank = r.get("peak_mem_gb_per_rank")
        row["peak_mem_gb"] = max(per_rank) if per_rank else None
        if step_s(r) is None and "error" not in row:
            row["error"] = "the run printed no step time"
        rows.append(row)
    name = f"pipe-gpt1.3b-{device}-{today:%Y%m%d}.json"
    # CPU smoke runs go to --out only, never into benchmarks/results/
    results_dir = Path(REPO, "benchmarks", "results")
    path = write_results(
        scenario="pipe-gpt1.3b",
        device=f"{args.nproc}x {device}",
        date=today.isoformat(),
        path=Path(args.out) / name,
        copy_to_out=False,
        model="GPT d=2048 L=24 vocab=32768 seq=1024 (1.34B), 2 stages, 8 micro-batches of 4",
        runs=rows,
        ratios=ratios,
    )
    if results_dir.is_dir() and torch.cuda.is_available():
        shutil.copy(path, results_dir / name)
    print(path.read_text())


if __name__ == "__main__":
    main()
