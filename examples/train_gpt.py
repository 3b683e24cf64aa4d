"""The main job: a character-level GPT learns this repository's own documentation.

Launched by ``nox -s demo`` as ``ds-launch --num_gpus 2 examples/train_gpt.py ...`` (2 CPU ranks,
ZeRO-3 from ds_config.json; on a GPU machine the same command uses the GPUs). It trains with a
progress bar, saves a checkpoint every --save_every steps and at the end; with --resume it loads
the newest checkpoint and continues. Rank 0 appends (step, its own loss) to --log and the demo
plots it.

Two losses appear, labelled: the progress bar shows ``rank0 loss`` (rank 0's micro-batch loss of
that step, which is what the log holds), and the engine's line every ``steps_per_print`` steps
shows ``mean loss over N ranks`` (all-reduced over the data-parallel ranks, so it differs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpt import GPT  # noqa: E402

import ds_all as deepspeed  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def corpus() -> str:
    """The project's own docs: every README, CHANGELOG and CONTRIBUTING file, sorted by path."""
    files = sorted(p for p in ROOT.rglob("*.md") if ".nox" not in p.parts and "out" not in p.parts)
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)


class Progress:
    """A text progress bar printed as whole lines (the launcher prefixes each rank's lines, so a
    carriage-return bar would turn into one endless line): every `every` steps and at the end."""

    def __init__(self, total: int, start: int, every: int = 25, width: int = 30) -> None:
        self.total, self.start, self.every, self.width = total, start, every, width
        self.t0 = time.perf_counter()

    def update(self, step: int, loss: float) -> None:
        if step % self.every and step != self.total:
            return
        done = step / self.total
        bar = "#" * int(done * self.width)
        rate = (step - self.start) / max(1e-9, time.perf_counter() - self.t0)
        eta = (self.total - step) / rate if rate > 0 else 0.0
        print(f"train [{bar:<{self.width}}] {step}/{self.total} ({done:4.0%}) rank0 loss {loss:.3f} "
              f"{rate:.2f} step/s eta {eta:4.0f}s", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300, help="train until this global step")
    parser.add_argument("--save_dir", default="out/demo/ckpt")
    parser.add_argument("--save_every", type=int, default=100)
    parser.add_argument("--resume", action="store_true", help="load the newest checkpoint first")
    parser.add_argument("--log", default="out/demo/losses.jsonl")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--local_rank", type=int, default=-1)  # DeepSpeed launchers pass it
    deepspeed.add_config_arguments(parser)
    args = parser.parse_args()

    text = corpus()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)

    torch.manual_seed(0)
    model = GPT(vocab=len(chars), d=128, heads=4, layers=4, seq=args.seq)
    engine, _, _, _ = deepspeed.initialize(
        args=args, model=model, model_parameters=model.parameters()
    )
    rank, world = engine.global_rank, engine.world_size
    micro = engine.train_micro_batch_size_per_gpu()

    if args.resume:
        path, client = engine.load_checkpoint(args.save_dir)
        if rank == 0:
            print(
                f"resumed from {path} at step {engine.global_steps} (client state {client})",
                flush=True,
            )

    show = rank == 0
    progress = Progress(args.steps, engine.global_steps) if show else None
    log_file = open(args.log, "a") if show else None  # noqa: SIM115
    loss_value = float("nan")
    while engine.global_steps < args.steps:
        # The batch depends only on (step, rank), so a resumed run sees the same data.
        g = torch.Generator().manual_seed(10_000 * engine.global_steps + rank)
        starts = torch.randint(0, len(data) - args.seq - 1, (micro,), generator=g)
        x = torch.stack([data[s : s + args.seq] for s in starts]).to(engine.device)
        y = torch.stack([data[s + 1 : s + 1 + args.seq] for s in starts]).to(engine.device)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        step = engine.global_steps
        if show:
            loss_value = loss.item()
            log_file.write(
                json.dumps({"step": step, "loss": loss_value, "resumed": args.resume}) + "\n"
            )
            log_file.flush()
            progress.update(step, loss_value)
        if step % args.save_every == 0 or step == args.steps:
            engine.save_checkpoint(
                args.save_dir, client_state={"chars": len(chars), "world_size": world}
            )
    if show:
        print(
            f"done: step {engine.global_steps}, last rank0 loss {loss_value:.4f}, "
            f"checkpoints in {args.save_dir}",
            flush=True,
        )
    engine.close()


if __name__ == "__main__":
    main()
