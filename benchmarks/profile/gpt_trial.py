"""The training script every autotuning trial of autotune_bench.py launches: the GPT of
shared/peers/tinygpt.py in bf16 with AdamW, on ds_all (``--impl ours``) or DeepSpeed 0.19.8
(``--impl deepspeed``), DeepSpeed's flags (``--deepspeed --deepspeed_config CONFIG``; DeepSpeed's
autotuner passes the config base64-encoded there, which its own initialize() reads)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _peers(arg: str | None) -> Path:
    for p in [Path(arg)] if arg else [ROOT / "shared" / "peers", Path("/work/shared/peers")]:
        if (p / "tinygpt.py").is_file():
            return p
    raise SystemExit("tinygpt.py not found; pass --peers-dir")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--deepspeed", action="store_true")
    ap.add_argument("--deepspeed_config", required=True)
    ap.add_argument("--impl", choices=("ours", "deepspeed"), default="ours")
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument(
        "--steps", type=int, default=100, help="the engine exits after the autotuning profile steps"
    )
    ap.add_argument("--gradient_checkpointing", action="store_true")
    ap.add_argument("--peers-dir")
    ap.add_argument("--local_rank", type=int, default=-1)  # DeepSpeed's launcher may append it
    args = ap.parse_args()
    sys.path.insert(0, str(_peers(args.peers_dir)))
    from tinygpt import GPT, batch

    if args.impl == "deepspeed":
        import deepspeed as ds
    else:
        import ds_all as ds

    torch.manual_seed(0)
    # built on the GPU: initialising billions of weights on the host costs seconds per trial
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = GPT(vocab=args.vocab, d=args.d, h=args.d // 128, L=args.layers, T=args.seq)
    if args.gradient_checkpointing:
        for block in model.blocks:
            plain = block.forward
            block.forward = lambda x, plain=plain: checkpoint(plain, x, use_reentrant=False)
    engine, *_ = ds.initialize(
        model=model, model_parameters=model.parameters(), config=args.deepspeed_config
    )
    rank = int(os.environ.get("RANK", 0))
    mbs = engine.train_micro_batch_size_per_gpu()
    for step in range(args.steps * engine.gradient_accumulation_steps()):
        x, y = batch(step, rank, mbs, args.seq, args.vocab, engine.device)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()


if __name__ == "__main__":
    main()
