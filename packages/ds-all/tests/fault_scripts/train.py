"""A deterministic training job for the fault-tolerance tests and benchmarks (run per rank by
ds-launch or directly with RANK/WORLD_SIZE/MASTER_* set).

Every rank appends ``{"step", "loss" (float.hex of each micro-batch loss), "port"}`` lines to
``OUT/losses_rank{R}.jsonl`` after each optimizer step, writes its pid to
``OUT/pids/rank{R}`` and rank 0 its progress to ``OUT/progress`` (``"<port> <step>"``) so a
driver can kill a rank at a chosen step. Checkpoints go to ``OUT/ckpt`` every ``--save_every``
steps; with ``--auto_resume`` a restarted job continues from the newest complete one.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import ds_all


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 64, d: int = 32, layers: int = 3, seq: int = 8) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
            for _ in range(layers)
        )
        self.head = nn.Linear(d, vocab, bias=False)
        self.diverge_at: tuple[int, int] | None = None  # (rank, step): call blocks[1] twice
        self.rank, self.step = 0, 0

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for i, b in enumerate(self.blocks):
            x = x + b(x)
            if i == 1 and self.diverge_at == (self.rank, self.step):
                x = x + b(x)  # rank-dependent control flow: blocks.1 runs twice on one rank
        logits = self.head(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def batch(step: int, micro_step: int, rank: int, micro: int = 4, seq: int = 8, vocab: int = 64):
    g = torch.Generator().manual_seed(1_000_003 * step + 1009 * micro_step + rank)
    x = torch.randint(0, vocab, (micro, seq + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--save_every", type=int, default=3)
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--gas", type=int, default=2)
    p.add_argument("--auto_resume", action="store_true")
    p.add_argument("--save_on_signal", action="store_true")
    p.add_argument("--comms_timeout", type=float, default=None)
    p.add_argument("--stall_rank", type=int, default=-1)
    p.add_argument("--stall_step", type=int, default=-1)
    p.add_argument("--diverge_rank", type=int, default=-1)
    p.add_argument("--diverge_step", type=int, default=-1)
    p.add_argument("--step_sleep", type=float, default=0.0, help="slow steps down (signals)")
    a = p.parse_args()

    torch.manual_seed(1234)
    torch.use_deterministic_algorithms(True)
    model = TinyLM()
    zero: dict = {"stage": a.stage}
    if a.stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # every block is gathered per call
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": a.gas,
        "steps_per_print": 10_000,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 3e-3,
                                                     "warmup_num_steps": 5}},
        "zero_optimization": zero,
        "checkpoint": {"save_dir": os.path.join(a.out, "ckpt"), "auto_resume": a.auto_resume,
                       "save_on_signal": a.save_on_signal},
        "fault_tolerance": {"comms_timeout": a.comms_timeout},
    }  # fmt: skip
    engine, *_ = ds_all.initialize(model=model, config=config)
    rank, port = engine.global_rank, os.environ.get("MASTER_PORT", "0")
    model.rank = rank
    if a.diverge_rank >= 0:
        model.diverge_at = (a.diverge_rank, a.diverge_step)
    os.makedirs(os.path.join(a.out, "pids"), exist_ok=True)
    _atomic_write(os.path.join(a.out, "pids", f"rank{rank}"), f"{port} {os.getpid()}")
    losses = open(os.path.join(a.out, f"losses_rank{rank}.jsonl"), "a")  # noqa: SIM115
    if rank == 0:
        resumed = engine.fault.resumed_tag
        with open(os.path.join(a.out, "starts.jsonl"), "a") as f:
            f.write(json.dumps({"port": port, "resumed": resumed, "step": engine.global_steps,
                                "t": time.time()}) + "\n")  # fmt: skip

    for step in range(engine.global_steps, a.steps):
        model.step = step
        if rank == a.stall_rank and step == a.stall_step:
            print(f"rank {rank}: stalling at step {step}", flush=True)
            _atomic_write(os.path.join(a.out, "stalled"), f"{time.time()}")
            time.sleep(3600)  # stops taking part: alive, never enters the next collective
        if rank == a.diverge_rank and step == a.diverge_step:
            _atomic_write(os.path.join(a.out, "diverged"), f"{time.time()}")
        micro = []
        for m in range(a.gas):
            loss = engine(*batch(step, m, rank))
            engine.backward(loss)
            micro.append(float(loss.detach()).hex())
            if m == a.gas - 1:
                # before the boundary step(): a save-on-SIGTERM exits from inside it
                losses.write(json.dumps({"step": step, "loss": micro, "port": port}) + "\n")
                losses.flush()
            engine.step()
        if (step + 1) % a.save_every == 0:
            engine.save_checkpoint(os.path.join(a.out, "ckpt"))
        if rank == 0:
            _atomic_write(os.path.join(a.out, "progress"), f"{port} {step + 1}")
        if a.step_sleep:
            time.sleep(a.step_sleep)
    engine.close()
    if rank == 0:
        _atomic_write(os.path.join(a.out, "done"), f"{port} {a.steps}")


if __name__ == "__main__":
    main()
