"""ZeRO-2 + CPU optimizer offload: ds_zero + ds_offload vs DeepSpeed, same GPT, same session.

    python benchmarks/offload/zero2_offload_gpu.py --gpus 2 --steps 10

Launches (torchrun, one after the other on the same GPUs) this file as a worker with ds_zero
ZeRO-2 + ds_offload.OffloadStepper(device=cpu, pin_memory) and then DeepSpeed's
ds_peer_gpu.py STAGE=2 ... offload; both train tinygpt d=2048, L=24, vocab 32768, seq 1024,
micro-batch 8 per GPU, bf16, AdamW lr 1e-4, clip 1.0. Writes
benchmarks/results/zero2-offload-<device>-<yyyymmdd>.json (and $OUT/) with both runs and the
tokens/s ratio. --skip-peer runs ours only (DeepSpeed not installed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _paths import ROOT, peers_dir, pythonpath  # next to this file

sys.path.insert(0, str(ROOT / "benchmarks"))  # the shared results writer
from _results import write_results  # noqa: E402


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(peers_dir(args.peers_dir)))
    from tinygpt import GPT, batch

    import ds_offload
    import ds_zero

    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    T, V, d, L, B = 1024, 32768, args.d, args.layers, args.batch
    model = GPT(vocab=V, d=d, h=d // 128, L=L, T=T).cuda()
    n = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)  # holds the param-group options only
    # 0: ds_offload's default, this rank's share of the cores (what ds_all's engine uses)
    stepper = ds_offload.OffloadStepper(
        {"device": "cpu", "pin_memory": True, "ratio": args.ratio, "num_threads": args.cpu_threads},
        grad_buffers=args.grad_buffers,
    )
    threads = stepper.num_threads
    zero = ds_zero.wrap(
        model,
        opt,
        ds_zero.ZeroOptions(stage=2, param_dtype=torch.bfloat16, gradient_clipping=1.0),
        stepper=stepper,
    )
    torch.cuda.reset_peak_memory_stats()
    for s in range(args.steps):
        if s == 3:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        x, y = batch(s, rank, B, T, V, "cuda")
        loss = zero(x, y)
        zero.backward(loss)
        zero.step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / (args.steps - 3)
    if rank == 0:
        print(json.dumps({
            "peer": "ds_zero-z2+ds_offload-cpu", "world": world, "params_M": round(n / 1e6, 1),
            "step_s": round(dt, 4), "tok_s": round(B * T * world / dt),
            "tflops_per_gpu": round(6 * n * B * T / dt / 1e12, 1),
            "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "loss": round(loss.item(), 3), "cpu_adam_threads": threads, "ratio": args.ratio,
            "grad_buffers": args.grad_buffers,
        }), flush=True)  # fmt: skip
    dist.destroy_process_group()


def _run(cmd: list[str], env: dict[str, str]) -> dict | None:
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    sys.stderr.write(proc.stderr[-4000:])
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    print(proc.stdout[-4000:])
    return {"error": f"exit {proc.returncode}", "stderr_tail": proc.stderr[-2000:]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--dim", "--d", dest="d", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ratio", type=float, default=1.0)
    ap.add_argument("--cpu-threads", type=int, default=0)
    ap.add_argument("--grad-buffers", type=int, default=4,
                    help="ds_offload's rotating host gradient buffers (0: one per partition)")  # fmt: skip
    ap.add_argument("--tag", default="", help="appended to the result file's name")
    ap.add_argument("--peers-dir", default=None)
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--device-name", default="2xH200")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    env = dict(
        os.environ,
        PYTHONPATH=pythonpath(),
        TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"),
    )
    tr = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.gpus}",
    ]
    # "--d" would be an ambiguous prefix of torchrun options, even after the script name
    fwd = ["--steps", str(args.steps), "--dim", str(args.d), "--layers", str(args.layers),
           "--batch", str(args.batch), "--ratio", str(args.ratio), "--cpu-threads", str(args.cpu_threads),
           "--grad-buffers", str(args.grad_buffers)]  # fmt: skip
    if args.peers_dir:
        fwd += ["--peers-dir", args.peers_dir]
    ours = _run([*tr, __file__, "--worker", *fwd], env)
    peer = None
    if not args.skip_peer:
        peer_script = peers_dir(args.peers_dir) / "ds_peer_gpu.py"
        peer = _run(
            [
                *tr,
                str(peer_script),
                "2",
                str(args.steps),
                str(args.d),
                str(args.layers),
                str(args.batch),
                "offload",
            ],
            env,
        )
    runs, ratios = [], {}
    for system, r in (("ds_zero-z2+ds_offload-cpu", ours), ("deepspeed-z2-offload", peer)):
        if r is None:  # --skip-peer
            continue
        if "step_s" in r:
            rest = {k: v for k, v in r.items() if k not in ("peer", "step_s", "tok_s", "peak_gb")}
            runs.append({"system": r["peer"], "step_s": r["step_s"], "tokens_per_s": r["tok_s"],
                         "peak_mem_gb": r["peak_gb"], **rest})  # fmt: skip
        else:
            runs.append({"system": system, "error": r.get("error", "no result line"),
                         "stderr_tail": r.get("stderr_tail"), "peak_mem_gb": None})  # fmt: skip
    if len(runs) == 2 and "tokens_per_s" in runs[0] and "tokens_per_s" in runs[1]:
        ratios[f"{runs[0]['system']}/{runs[1]['system']} tokens_per_s"] = round(
            runs[0]["tokens_per_s"] / runs[1]["tokens_per_s"], 3
        )
    extra = {"deepspeed": "not run (--skip-peer)"} if args.skip_peer else {}
    name = f"zero2-offload-{args.device_name}-{time.strftime('%Y%m%d')}{args.tag}.json"
    path = write_results(
        scenario="zero2-offload", device=args.device_name, date=time.strftime("%Y-%m-%d %H:%M:%S"),
        path=ROOT / "benchmarks" / "results" / name, runs=runs, ratios=ratios, **extra,
    )  # fmt: skip
    print(path.read_text())


if __name__ == "__main__":
    main()
