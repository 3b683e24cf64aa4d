"""One rank of a ds-zero training benchmark (run by torchrun; run.py drives it beside the peers).

Trains the peers' GPT (``tinygpt.py`` from the peers folder, imported so model and data are the
very ones the peers train) with ``ds_zero.wrap`` at the given stage, bf16 parameters with fp32
master weights and fp32 gradient reduction, AdamW, clipping 1.0, and prints one JSON line with
the peers' keys (step_s, tok_s, tflops_per_gpu, peak_gb, loss):

    torchrun --nproc_per_node 2 benchmarks/zero/bench.py --stage 3 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for src in sorted((ROOT / "packages").glob("*/src")):
    if str(src) not in sys.path:
        sys.path.insert(0, str(src))


def default_peers_dir() -> Path:
    for cand in (
        os.environ.get("DS_PEERS_DIR"),
        ROOT / "shared" / "peers",
        ROOT.parent / "shared" / "peers",
    ):
        if cand and (Path(cand) / "tinygpt.py").exists():
            return Path(cand)
    return ROOT / "shared" / "peers"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--stage", type=int, required=True, choices=[0, 1, 2, 3])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=0, help="0: dim // 128 (the GPU peers' choice)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--reduce-dtype", default="fp32", choices=["bf16", "fp32"])
    ap.add_argument("--bucket", type=float, default=5e7, help="reduce bucket size (elements)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--peers-dir", type=Path, default=None)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    import torch
    import torch.distributed as dist

    import ds_zero

    sys.path.insert(0, str(args.peers_dir or default_peers_dir()))
    from tinygpt import GPT, batch  # the peers' model and data, not a copy

    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    d, L, B, T, V = args.dim, args.layers, args.batch, args.seq, args.vocab
    heads = args.heads or max(1, d // 128)
    model = GPT(vocab=V, d=d, h=heads, L=L, T=T).to(device)
    n = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=cuda)
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    options = ds_zero.ZeroOptions(
        stage=args.stage,
        param_dtype=dtypes[args.dtype],
        reduce_dtype=dtypes[args.reduce_dtype],
        reduce_bucket_size=int(args.bucket),
        gradient_clipping=1.0,
    )
    zero = ds_zero.wrap(model, opt, options)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    for s in range(args.steps):
        if s == 3:
            sync()
            t0 = time.perf_counter()
        x, y = batch(s, rank, B, T, V, device)
        loss = zero(x, y)
        zero.backward(loss)
        zero.step()
    sync()
    dt = (time.perf_counter() - t0) / (args.steps - 3)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None  # CPU: not measured
    if rank == 0:
        print(
            json.dumps(
                {
                    "peer": f"ds-zero-z{args.stage}",
                    "world": world,
                    "params_M": round(n / 1e6, 1),
                    "step_s": round(dt, 4),
                    "tok_s": round(B * T * world / dt),
                    "tflops_per_gpu": round(6 * n * B * T / dt / 1e12, 1),
                    "peak_gb": None if peak is None else round(peak, 2),
                    "loss": round(loss.item(), 3),
                }
            ),
            flush=True,
        )
    zero.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
