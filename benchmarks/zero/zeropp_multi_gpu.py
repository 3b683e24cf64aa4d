"""ZeRO-3 against ZeRO++ (qwZ + qgZ + hpZ, and each alone) on N GPUs: tokens/s and bytes per step.

A GPT-shaped model (bf16, fp32 masters, AdamW) trained with ds-zero stage 3; each system runs
`--warmup` then `--steps` timed steps, then one step with ds-comm's comms logger on, whose bytes
per collective name (all-gathers, reduce-scatter, qgZ's intra/inter-node all-to-alls) go into the
results. `--ranks-per-node` sets qgZ's node size and hpZ's group (default: LOCAL_WORLD_SIZE):
with one host of 8 GPUs, `--ranks-per-node 4` simulates 2 nodes. Runs on 1 GPU too (nothing is
communicated there; the numbers then only show the quantizer's cost is absent).

    torchrun --standalone --nproc_per_node=N benchmarks/zero/zeropp_multi_gpu.py [--layers 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _results import write_results  # noqa: E402

import ds_comm  # noqa: E402
import ds_zero  # noqa: E402


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, seq: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        for blk in self.blocks:
            h = blk(h)
        logits = self.head(self.ln(h)).float()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1))


SYSTEMS = {
    "ds-zero-z3": {},
    "ds-zero-qwz": {"quantized_weights": True},
    "ds-zero-qgz": {"quantized_gradients": True},
    "ds-zero-hpz": {"hpz": True},
    "ds-zero-zeropp": {"quantized_weights": True, "quantized_gradients": True, "hpz": True},
}


def run_system(name: str, kw: dict, args: argparse.Namespace, per_node: int) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = GPT(args.vocab, args.d, args.layers, args.heads, args.seq).cuda()
    kw = dict(kw)
    hpz = per_node if kw.pop("hpz", False) else 1
    opts = ds_zero.ZeroOptions(
        stage=3, param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16,
        hpz_partition_size=hpz, ranks_per_node=per_node, **kw,
    )  # fmt: skip
    zero = ds_zero.wrap(model, torch.optim.AdamW(model.parameters(), lr=1e-4), opts)
    g = torch.Generator(device="cuda").manual_seed(rank)

    def step() -> float:
        x = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device="cuda", generator=g)
        loss = zero(x[:, :-1], x[:, 1:])
        zero.backward(loss)
        zero.step()
        return loss

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - t0) / args.steps
    logger = ds_comm.get_comms_logger()
    logger.reset()
    logger.enable()
    step()
    logger.disable()
    by_name: dict[str, int] = {}
    for s in logger.stats():
        by_name[s.name] = by_name.get(s.name, 0) + s.total_bytes
    logger.reset()
    peak = torch.cuda.max_memory_allocated() / 2**30
    zero.close()
    return {
        "system": name,
        "step_s": round(step_s, 5),
        "tokens_per_s": round(args.batch * args.seq * world / step_s, 1),
        "peak_mem_gb": round(peak, 3),
        "bytes_per_step": by_name,
        "final_loss": round(float(loss), 4),
        "hpz_partition_size": hpz,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--ranks-per-node", type=int, default=None)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    args = ap.parse_args()
    ds_comm.init_distributed()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    world = dist.get_world_size()
    per_node = args.ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    runs = []
    for name in args.systems.split(","):
        runs.append(run_system(name, SYSTEMS[name], args, per_node))
        torch.cuda.empty_cache()  # the previous system's buffers
    if dist.get_rank() == 0:
        base = next((r for r in runs if r["system"] == "ds-zero-z3"), None)
        ratios = {}
        if base is not None:
            for r in runs:
                if r is not base:
                    ratios[f"{r['system']}/ds-zero-z3 tokens_per_s"] = round(
                        r["tokens_per_s"] / base["tokens_per_s"], 3
                    )
                    total = sum(r["bytes_per_step"].values())
                    if total:
                        ratios[f"ds-zero-z3/{r['system']} bytes_per_step"] = round(
                            sum(base["bytes_per_step"].values()) / total, 3
                        )
        path = write_results(
            scenario="zeropp",
            device=f"{world} x {torch.cuda.get_device_name()}",
            runs=runs,
            ratios=ratios,
            config={**vars(args), "world": world, "ranks_per_node": per_node},
        )
        for r in runs:
            print(r)
        print(ratios)
        print(f"results: {path}")
    ds_comm.destroy_process_group()


if __name__ == "__main__":
    main()
