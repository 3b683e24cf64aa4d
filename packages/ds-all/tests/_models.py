"""Small models and data shared by the engine tests (importable by spawned ranks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 48, d: int = 32, layers: int = 2, seq: int = 8) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
            for _ in range(layers)
        )
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = x + b(x)
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def batch(
    step: int, micro: int, seq: int = 8, vocab: int = 48
) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step: rows [r*micro, (r+1)*micro) belong to rank r."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randint(0, vocab, (micro, seq + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def config(stage: int, micro: int, gas: int = 1, **extra) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "steps_per_print": 1000,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
        "scheduler": {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": 1e-2,
                "warmup_num_steps": 3,
                "warmup_type": "linear",
            },
        },
        "gradient_clipping": 0.5,
        "zero_optimization": {
            "stage": stage,
            "reduce_bucket_size": 2000,
            "stage3_param_persistence_threshold": 100,
        },
    }
    cfg.update(extra)
    return cfg


def plain_setup() -> tuple[TinyGPT, torch.optim.Optimizer, object]:
    """The model, optimizer and schedule of ``config`` in plain PyTorch (seeded as the engine
    tests seed theirs)."""
    from ds_all import WarmupLR

    torch.manual_seed(0)
    model = TinyGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = WarmupLR(
        opt, warmup_min_lr=0.0, warmup_max_lr=1e-2, warmup_num_steps=3, warmup_type="linear"
    )
    return model, opt, sched


def reference(
    steps: int, world: int, micro: int, gas: int
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Plain PyTorch: the same model, optimizer, clipping and schedule on the whole global batch."""
    model, opt, sched = plain_setup()
    losses = []
    for step in range(steps):
        total = 0.0
        for k in range(gas):
            x, y = batch(step * gas + k, micro * world)
            loss = model(x, y) / gas
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
        sched.step()
        losses.append(total)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def sequential_sgd_losses(model: nn.Module, batches, steps: int, lr: float,
                          clip: float = 1.0) -> list[float]:  # fmt: skip
    """What a pipeline run is checked against: ``model`` (every stage in one process) trained
    with SGD, each step on ``batches(step)``'s micro-batches with their MSE losses averaged and
    the gradient norm clipped at ``clip`` (DeepSpeed's default, 1.0); the loss per step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    out = []
    for step in range(steps):
        micro = batches(step)
        total = 0.0
        for x, y in micro:
            loss = F.mse_loss(model(x), y) / len(micro)
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        out.append(total)
    return out
