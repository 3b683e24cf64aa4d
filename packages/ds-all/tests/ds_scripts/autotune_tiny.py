"""A tiny training job the Autotuner tests launch (gloo ranks), with DeepSpeed's flags."""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import ds_all


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--deepspeed_config", required=True)
    p.add_argument("--local_rank", type=int, default=-1)
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(512, 16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    engine, *_ = ds_all.initialize(model=model, config=args.deepspeed_config)
    mbs = engine.train_micro_batch_size_per_gpu()
    for step in range(args.steps):
        ids = torch.randint(0, 512, (mbs, 4), generator=torch.Generator().manual_seed(step))
        logits = engine(ids)
        loss = F.cross_entropy(logits.reshape(-1, 8), (ids % 8).reshape(-1))
        engine.backward(loss)
        engine.step()


if __name__ == "__main__":
    main()
