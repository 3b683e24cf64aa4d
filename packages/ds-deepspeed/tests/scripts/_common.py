"""Shared pieces of the client scripts: a tiny GPT-2 built from its config (no download),
seeded token data, and the plain-PyTorch reference loop the clients are compared with."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch

VOCAB, SEQ = 64, 16
LR, WARMUP, CLIP = 1e-2, 4, 1.0


def tiny_gpt2(seed: int = 0, from_config: bool = False) -> Any:
    """``from_config``: through ``AutoModelForCausalLM.from_config``, which builds the model
    inside ``deepspeed.zero.Init`` when a ZeRO-3 config is active (Trainer's path)."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config) if from_config else GPT2LMHeadModel(config)


def samples(n: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def ds_config(stage: int, micro: Any, gas: Any, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": CLIP,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": LR, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
        },  # fmt: skip
        "scheduler": {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": LR,
                "warmup_num_steps": WARMUP,
                "warmup_type": "linear",
            },
        },  # fmt: skip
        "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True},
    }
    cfg.update(extra)
    return cfg


def warmup_lr(step: int) -> float:
    """WarmupLR (linear) in force during optimizer step ``step`` (0-based). DeepSpeed's schedule
    sets warmup_min_lr at construction and its first step() computes iteration 0 (gamma 0), so
    optimizer steps 0 and 1 both run at warmup_min_lr."""
    return LR * min(1.0, max(0, step - 1) / WARMUP)


def reference(steps: int, micro: int, gas: int, world: int = 1) -> dict[str, Any]:
    """The same training in plain PyTorch: per micro-step losses (the mean over the world's
    ranks), the learning rate in force at each micro-step, and the final weights."""
    model = tiny_gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=warmup_lr(0), betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.0)  # fmt: skip
    data = samples(steps * gas * micro * world)
    losses, lrs = [], []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = warmup_lr(step)
        for k in range(gas):
            first = (step * gas + k) * micro * world
            rank_losses = []
            for r in range(world):
                rows = data[first + r * micro : first + (r + 1) * micro]
                ids = torch.stack([s["input_ids"] for s in rows])
                loss = model(input_ids=ids, labels=ids).loss
                (loss / (gas * world)).backward()
                rank_losses.append(float(loss))
            losses.append(sum(rank_losses) / world)
            lrs.append(warmup_lr(step))
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
    return {"losses": losses, "lrs": lrs, "state": model.state_dict()}


def write_json(path: str, data: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1, allow_nan=True)


def which_deepspeed() -> str:
    import importlib.metadata

    return importlib.metadata.version("deepspeed")


def finite(values: list[float]) -> bool:
    return all(math.isfinite(v) for v in values)
