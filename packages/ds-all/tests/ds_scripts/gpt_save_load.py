"""A small GPT trained, saved, reloaded into a fresh engine and trained on, written against
DeepSpeed's documented API only. Usage: python gpt_save_load.py OUT.json CKPT_DIR"""

import json
import sys

import deepspeed
import torch
import torch.nn.functional as F
from torch import nn


class GPT(nn.Module):
    def __init__(self, vocab=64, d=32, seq=16):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d, 2, 4 * d, dropout=0.0, batch_first=True) for _ in range(2)
        )
        self.head = nn.Linear(d, vocab)

    def forward(self, idx, targets):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        mask = nn.Transformer.generate_square_subsequent_mask(idx.shape[1])
        for layer in self.layers:
            x = layer(x, src_mask=mask, is_causal=True)
        return F.cross_entropy(self.head(x).flatten(0, 1), targets.flatten())


CONFIG = {
    "train_micro_batch_size_per_gpu": 8,
    "optimizer": {
        "type": "AdamW",
        "params": {"lr": 3e-3, "weight_decay": 0.01, "torch_adam": True},
    },
    "scheduler": {
        "type": "WarmupLR",
        "params": {
            "warmup_min_lr": 0,
            "warmup_max_lr": 3e-3,
            "warmup_num_steps": 4,
            "warmup_type": "linear",
        },
    },
    "zero_optimization": {"stage": 2},
    "steps_per_print": 100,
}


def batch(step):
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, 64, (8, 17), generator=g)
    return x[:, :-1], x[:, 1:]


def train(engine, steps):
    out = []
    for _ in range(steps):
        x, y = batch(engine.global_steps)
        loss = engine(x.to(engine.device), y.to(engine.device))
        engine.backward(loss)
        engine.step()
        out.append(loss.item())
    return out


def main(out_path, ckpt):
    torch.manual_seed(0)
    model = GPT()
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=CONFIG
    )
    first = train(engine, 5)
    engine.save_checkpoint(ckpt, client_state={"epoch": 1})
    torch.manual_seed(1)  # a different init: the load must overwrite it
    model2 = GPT()
    engine2, _, _, _ = deepspeed.initialize(
        model=model2, model_parameters=model2.parameters(), config=CONFIG
    )
    _, client = engine2.load_checkpoint(ckpt)
    second = train(engine2, 5)
    with open(out_path, "w") as f:
        json.dump(
            {
                "first": first,
                "second": second,
                "client_epoch": client["epoch"],
                "steps": engine2.global_steps,
            },
            f,
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
