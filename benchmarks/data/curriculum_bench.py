"""Seqlen curriculum learning against none, over the same token budget, through ds_all's engine.

    python benchmarks/data/curriculum_bench.py                       # small CPU run (~1 min)
    python benchmarks/data/curriculum_bench.py --device cuda --d-model 512 --layers 8 \
        --seq 1024 --batch 16 --tokens 20000000

A GPT (causal self-attention, pre-norm blocks) learns a synthetic language (a fixed random
order-1 Markov chain with a few likely successors per token, so the loss has a known floor).
Both runs consume the same number of training tokens. ``no-curriculum`` trains at the full
sequence length; ``seqlen-curriculum`` uses DeepSpeed's legacy ``curriculum_learning`` section
(fixed_linear from ``--min-seq`` to the full length over the first ``--ramp`` of the baseline's
steps): the engine passes ``curriculum_seqlen`` and the model truncates its batch, as Megatron's
GPT does, so early steps are cheaper and the run takes more steps for the same tokens. Reported
per run: tokens/s (training tokens over wall time), steps, and the final loss on held-out
full-length sequences. Results: scenario ``curriculum-seqlen`` in benchmarks/results/ (and $OUT).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _results import write_results  # noqa: E402


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True)  # fmt: skip
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, seq: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx, targets, curriculum_seqlen=None):
        if curriculum_seqlen is not None:  # Megatron's GPT: train on the first N tokens
            idx, targets = idx[:, :curriculum_seqlen], targets[:, :curriculum_seqlen]
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class Markov:
    """Sequences from a fixed random chain: each token has ``fanout`` likely successors."""

    def __init__(self, vocab: int, fanout: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        logits = torch.full((vocab, vocab), -4.0)
        succ = torch.stack([torch.randperm(vocab, generator=g)[:fanout] for _ in range(vocab)])
        logits.scatter_(1, succ, torch.randn(vocab, fanout, generator=g) + 2.0)
        self.probs = torch.softmax(logits, -1)
        self.entropy = float(-(self.probs * self.probs.log()).sum(-1).mean())

    def sample(self, batch: int, length: int, g: torch.Generator) -> torch.Tensor:
        out = torch.empty(batch, length, dtype=torch.long)
        out[:, 0] = torch.randint(0, self.probs.shape[0], (batch,), generator=g)
        for t in range(1, length):
            out[:, t] = torch.multinomial(self.probs[out[:, t - 1]], 1, generator=g).squeeze(1)
        return out


def run(args, curriculum: bool, data: Markov, held_out: torch.Tensor) -> dict:
    import ds_all

    torch.manual_seed(0)
    model = GPT(args.vocab, args.d_model, args.layers, args.heads, args.seq)
    base_steps = args.tokens // (args.batch * args.seq)
    cfg = {"train_micro_batch_size_per_gpu": args.batch, "gradient_clipping": 1.0,
           "optimizer": {"type": "AdamW", "params": {"lr": args.lr, "weight_decay": 0.0}},
           "bf16": {"enabled": args.device == "cuda"}}  # fmt: skip
    if curriculum:
        cfg["curriculum_learning"] = {
            "enabled": True, "curriculum_type": "seqlen", "min_difficulty": args.min_seq,
            "max_difficulty": args.seq, "schedule_type": "fixed_linear",
            "schedule_config": {"total_curriculum_step": max(1, int(base_steps * args.ramp)),
                                "difficulty_step": 8},
        }  # fmt: skip
    engine, _, _, _ = ds_all.initialize(model=model, config=cfg)
    g = torch.Generator().manual_seed(1)
    tokens = steps = 0
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    wall = 0.0
    while tokens < args.tokens:
        seq = engine.curriculum_scheduler_legacy.get_difficulty(engine.global_steps + 1) \
            if curriculum else args.seq  # fmt: skip
        seq = min(seq, args.seq)
        # Data generation stays outside the timed region: tokens/s measures training only.
        x = data.sample(args.batch, args.seq + 1, g).to(engine.device)
        sync()
        start = time.perf_counter()
        loss = engine(x[:, :-1], x[:, 1:])
        engine.backward(loss)
        engine.step()
        sync()
        wall += time.perf_counter() - start
        tokens += args.batch * seq
        steps += 1
    engine.eval()
    with torch.no_grad():
        x = held_out.to(engine.device)
        final = float(engine(x[:, :-1], x[:, 1:]))
    return {"system": "seqlen-curriculum" if curriculum else "no-curriculum",
            "step_s": wall / steps, "tokens_per_s": tokens / wall, "steps": steps,
            "train_tokens": tokens, "wall_s": wall, "final_loss": final,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=600_000)
    ap.add_argument("--min-seq", type=int, default=16)
    ap.add_argument("--ramp", type=float, default=0.5, help="curriculum steps / baseline steps")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--device-name", default=None)
    args = ap.parse_args()
    if args.device == "cpu":
        import os

        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    data = Markov(args.vocab, fanout=3)
    held_out = data.sample(64, args.seq + 1, torch.Generator().manual_seed(99))
    runs = [run(args, False, data, held_out), run(args, True, data, held_out)]
    for r in runs:
        print(f"{r['system']}: {r['steps']} steps, {r['tokens_per_s']:.0f} tokens/s, "
              f"final loss {r['final_loss']:.4f}", flush=True)  # fmt: skip
    base, cur = runs
    device = args.device_name or (f"1x{torch.cuda.get_device_name()}" if args.device == "cuda"
                                  else f"cpu-{os_cpus()}c")  # fmt: skip
    path = write_results(
        scenario="curriculum-seqlen", device=device, runs=runs,
        ratios={"seqlen-curriculum/no-curriculum tokens_per_s": cur["tokens_per_s"] / base["tokens_per_s"],
                "no-curriculum/seqlen-curriculum final_loss": base["final_loss"] / cur["final_loss"]},
        config={k: v for k, v in vars(args).items() if k != "device_name"},
        loss_floor_entropy=data.entropy,
        load_average_1m=os_load(),
        note="same training-token budget; final_loss on 64 held-out full-length sequences",
    )  # fmt: skip
    print("wrote", path)


def os_load() -> float | None:
    """The machine's 1-minute load average when the run ended (other work skews tokens/s)."""
    import os

    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def os_cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


if __name__ == "__main__":
    main()
