"""ds-pipe on GPUs: the 1.34B GPT (d=2048, 24 layers, vocab 32768, seq 1024) in pipeline stages.

    torchrun --nproc_per_node 2 benchmarks/pipe/pipe_bench.py --out DIR [options]

One stage per GPU, 8 micro-batches of 4 sequences by default, AdamW (lr 1e-4) and gradient
clipping at 1.0 as in the DeepSpeed peer (the peers' ds_pipe_bench.py). Precision:

* ``--precision bf16`` (default, what DeepSpeed's ``bf16`` does): bf16 weights and activations,
  fp32 master weights in the optimizer, gradients accumulated over micro-batches in fp32.
  The fp32 master/accumulation glue lives in this script: it is ds-zero's job in the ds-all
  engine (ds-pipe does not do mixed precision).
* ``--precision autocast``: fp32 weights, the whole step under ``torch.autocast(bf16)``, what
  the torch.distributed.pipelining peer does.

Writes one JSON object (rank 0) with step time, tokens/s, TFLOP/s per GPU (6N), peak memory,
and the measured bubble next to the simulated one: per-stage forward/backward times are timed
with CUDA events around every compute action, and the schedule simulator is run with those
times (so imbalance between stages is part of the simulated bubble).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "packages", "ds-pipe", "src"))

from ds_pipe import (  # noqa: E402
    ActionKind,
    CostModel,
    LayerSpec,
    PipeDataParallelTopology,
    PipelineModule,
    PipelineRuntime,
    simulate,
)


# -- the model: same architecture as the peers' GPT, written for this benchmark ----------------
class TokenAndPosition(nn.Module):
    def __init__(self, vocab: int, d: int, seq: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))


class TransformerBlock(nn.Module):
    """Pre-LN block: causal SDPA attention (d/128 heads) and a 4d GELU MLP."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        qkv = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, c))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class LMHead(nn.Module):
    def __init__(self, d: int, vocab: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(x))


def make_loss(vocab: int):
    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, vocab).float(), labels.reshape(-1))

    return loss_fn


def batches(step: int, n: int, mbs: int, seq: int, vocab: int, device: torch.device):
    """Deterministic per step (both end stages draw the same data)."""
    g = torch.Generator().manual_seed(1000 + step)
    for _ in range(n):
        x = torch.randint(0, vocab, (mbs, seq + 1), generator=g)
        x[:, 1::2] = (x[:, 0:-1:2] * 7 + 3) % vocab  # learnable structure, as the peers' data
        yield x[:, :-1].to(device, non_blocking=True), x[:, 1:].to(device, non_blocking=True)


# -- fp32 master weights + fp32 gradient accumulation for bf16 weights -------------------------
class MasterWeights:
    """bf16 model weights, fp32 copies stepped by the optimizer, grads summed in fp32."""

    def __init__(self, params: list[nn.Parameter], lr: float) -> None:
        self.params = params
        self.master = [nn.Parameter(p.detach().float().clone()) for p in params]
        for m in self.master:
            m.grad = torch.zeros_like(m)
        for p, m in zip(params, self.master):
            p.register_post_accumulate_grad_hook(self._make_hook(m))
        self.opt = torch.optim.AdamW(self.master, lr=lr, fused=self.master[0].is_cuda)

    @staticmethod
    def _make_hook(master: nn.Parameter):
        def hook(p: torch.Tensor) -> None:
            master.grad.add_(p.grad)
            p.grad = None

        return hook

    def grads(self) -> list[torch.Tensor]:
        return [m.grad for m in self.master]

    @torch.no_grad()
    def step(self) -> None:
        self.opt.step()
        torch._foreach_copy_(self.params, self.master)
        for m in self.master:
            m.grad.zero_()


@torch.no_grad()
def clip_(grads: list[torch.Tensor], max_norm: float, group) -> torch.Tensor:
    """Global-norm clipping over the pipeline (every stage's gradients count)."""
    sq = torch.stack([torch.linalg.vector_norm(g.float()) ** 2 for g in grads]).sum()
    dist.all_reduce(sq, group=group)
    norm = sq.sqrt()
    torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return norm


# -- timing of compute actions -------------------------------------------------------------------
class ComputeTimer:
    """CUDA events (wall clock on CPU) around every forward/backward this rank runs."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.enabled = False
        self.records: list[tuple[ActionKind, int, object, object]] = []

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @contextlib.contextmanager
    def __call__(self, action):
        if not (self.enabled and action.kind.is_compute):
            yield
            return
        start = self._mark()
        yield
        self.records.append((action.kind, action.stage, start, self._mark()))

    def totals(self) -> dict[tuple[str, int], list[float]]:
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[tuple[str, int], list[float]] = {}
        for kind, stage, s, e in self.records:
            sec = s.elapsed_time(e) / 1e3 if self.cuda else e - s
            out.setdefault((kind.value, stage), []).append(sec)
        return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="directory for the JSON")
    ap.add_argument("--steps", type=int, default=13)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--n-layers", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--micro-batches", type=int, default=8)
    ap.add_argument("--schedule", default="1f1b", choices=["1f1b", "gpipe", "interleaved_1f1b"])
    ap.add_argument("--chunks", type=int, default=1, help="virtual stages per GPU")
    ap.add_argument(
        "--partition",
        default="parameters",
        help="'parameters' (DeepSpeed's default), 'uniform', 'type:REGEX', or boundaries '0,14,26'",
    )
    ap.add_argument("--precision", default="bf16", choices=["bf16", "autocast"])
    ap.add_argument("--tag", default="", help="label stored in the JSON and the file name")
    ap.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="cpu: gloo smoke run of this script's logic (use a tiny --dim/--n-layers)",
    )
    args = ap.parse_args()

    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    torch.manual_seed(0)

    d, L, V, T = args.dim, args.n_layers, args.vocab, args.seq
    layers = (
        [LayerSpec(TokenAndPosition, V, d, T)]
        + [LayerSpec(TransformerBlock, d, d // 128) for _ in range(L)]
        + [LayerSpec(LMHead, d, V)]
    )
    partition = args.partition
    if partition[0].isdigit():
        partition = [int(x) for x in partition.split(",")]
    with torch.device(device):
        module = PipelineModule(
            layers,
            topology=PipeDataParallelTopology(num_pp=world, num_dp=1),
            loss_fn=make_loss(V),
            partition_method=partition,
            seed_layers=True,
            num_chunks=args.chunks,
        )
    timer = ComputeTimer(cuda)
    if args.precision == "bf16":
        module.to(torch.bfloat16)
        master = MasterWeights(list(module.parameters()), lr=1e-4)
        runtime = PipelineRuntime(
            module, None, args.micro_batches, args.schedule, device=device, action_hook=timer
        )
    else:
        master = None
        opt = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=cuda)
        runtime = PipelineRuntime(
            module,
            opt,
            args.micro_batches,
            args.schedule,
            max_grad_norm=1.0,
            device=device,
            action_hook=timer,
        )

    def step(i: int) -> torch.Tensor:
        data = batches(i, args.micro_batches, args.micro_batch, T, V, device)
        if master is None:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return runtime.train_batch(data)
        loss = runtime.train_batch(data)
        clip_(master.grads(), 1.0, runtime.grid.pipe_group)
        master.step()
        return loss

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    n_local = torch.tensor([sum(p.numel() for p in module.parameters())], device=device)
    n_total = n_local.clone()
    dist.all_reduce(n_total)
    losses = []
    for i in range(args.steps):
        if i == args.warmup:
            sync()
            dist.barrier()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            timer.enabled = True
            t0 = time.perf_counter()
        loss = step(i)
        if i in (0, args.steps - 1):  # .item() syncs: only outside the steady state
            losses.append(loss.item())
    sync()
    elapsed = torch.tensor([time.perf_counter() - t0], device=device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    timed = args.steps - args.warmup
    step_s = elapsed.item() / timed

    # measured compute time per action kind and stage, gathered from every rank
    totals = timer.totals()
    mine = {f"{k}{s}": sum(v) / timed for (k, s), v in totals.items()}
    counts = {f"{k}{s}": len(v) / timed for (k, s), v in totals.items()}
    gathered: list[dict] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(
        gathered,
        {
            "busy": mine,
            "count": counts,
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        },
    )
    if rank == 0:
        num_virtual = world * args.chunks
        fwd = [0.0] * num_virtual
        bwd = [0.0] * num_virtual
        busy_per_rank = []
        for g in gathered:
            busy_per_rank.append(sum(g["busy"].values()))
            for key, total in g["busy"].items():
                kind, stage = key[0], int(key[1:])
                per_mb = total / g["count"][key]
                (fwd if kind == "F" else bwd)[stage] = per_mb
        sim = simulate(runtime.train_schedule, CostModel(forward=fwd, backward=bwd))
        measured_bubble = 1 - sum(busy_per_rank) / (world * step_s)
        p, m, v = world, args.micro_batches, args.chunks
        tokens = args.micro_batch * m * T
        result = {
            "scenario": "pipe-gpt1.3b",
            "tag": args.tag,
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "gpus": world,
            "torch": torch.__version__,
            "date": datetime.date.today().isoformat(),
            "config": vars(args),
            "partition": module.parts,
            "params_M": round(n_total.item() / 1e6, 1),
            "step_s": round(step_s, 4),
            "tokens_per_s": round(tokens / step_s),
            "tflops_per_gpu_6n": round(6 * n_total.item() * tokens / step_s / 1e12 / world, 1),
            "peak_mem_gb_per_rank": [round(g["peak_gb"], 2) for g in gathered],
            "loss_first_last": [losses[0], losses[-1]],
            "bubble": {
                "measured": round(measured_bubble, 4),
                "simulated_with_measured_costs": round(sim.bubble_fraction, 4),
                "simulated_step_s": round(sim.makespan, 4),
                "ideal_formula": round((p - 1) / (v * m + p - 1), 4),
                "busy_s_per_rank": [round(b, 4) for b in busy_per_rank],
                "forward_s_per_stage": [round(x, 5) for x in fwd],
                "backward_s_per_stage": [round(x, 5) for x in bwd],
            },
        }
        if math.isfinite(step_s):
            os.makedirs(args.out, exist_ok=True)
            name = f"pipe-gpt1.3b-{args.tag or args.schedule}.json"
            with open(os.path.join(args.out, name), "w") as f:
                json.dump(result, f, indent=1)
        print(json.dumps(result), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
