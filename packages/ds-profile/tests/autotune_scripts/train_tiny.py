"""A small training script the autotuner tests launch (2 gloo ranks): DeepSpeed-style flags."""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import ds_all


class Tiny(nn.Module):
    """Most parameters sit in the embedding (a lookup saves only its indices for backward), so
    the weights, not the activations, decide which ZeRO stage fits the test's budget."""

    def __init__(
        self,
        checkpointing: bool,
        vocab: int = 8192,
        d: int = 32,
        width: int = 64,
        classes: int = 64,
    ) -> None:
        super().__init__()
        self.checkpointing = checkpointing
        self.emb = nn.Embedding(vocab, d)
        self.mlp = nn.Sequential(nn.Linear(d, width), nn.GELU(), nn.Linear(width, d))
        self.head = nn.Linear(d, classes, bias=False)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        x = x + (
            checkpoint(self.mlp, x, use_reentrant=False) if self.checkpointing else self.mlp(x)
        )
        logits = self.head(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--deepspeed_config", required=True)
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args()
    torch.manual_seed(0)
    engine, *_ = ds_all.initialize(model=Tiny(args.checkpointing), config=args.deepspeed_config)
    mbs = engine.train_micro_batch_size_per_gpu()
    for step in range(args.steps):
        ids = torch.randint(0, 8192, (mbs, 8), generator=torch.Generator().manual_seed(step))
        loss = engine(ids, ids.roll(1, dims=1) % 64)
        engine.backward(loss)
        engine.step()


if __name__ == "__main__":
    main()
