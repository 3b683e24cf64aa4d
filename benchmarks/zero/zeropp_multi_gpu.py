"""ZeRO-3 against ZeRO++ (qwZ + qgZ + hpZ, and each alone) on N GPUs, ours beside DeepSpeed's.

A GPT-shaped model (bf16, fp32 masters, AdamW) trained with stage 3 by ds-zero (`ds-zero-*`)
and by DeepSpeed 0.19.8's engine (`deepspeed-z3`, `deepspeed-zeropp`: the same model, optimizer
and batches, `zero_quantized_weights` + `zero_quantized_gradients` + `zero_hpz_partition_size`
set to the node size), one after another in the same process group, ours first (DeepSpeed's
stage 3 leaves `torch.nn.functional.linear` patched for the rest of the process). Each system runs
`--warmup` then `--steps` timed steps; for ours, one more step with ds-comm's comms logger on,
whose bytes per collective name (all-gathers, reduce-scatter, qgZ's intra/inter-node
all-to-alls) go into the results (DeepSpeed's runs carry no byte counts). The timed steps run
as `--chunks` equal chunks, each timed alone; `step_s` is the median chunk's step time
(`step_s_chunks` has all), so one slow stretch (a clock change, another process) does not
decide a ratio between systems whose steps take a few milliseconds. `--ranks-per-node`
sets qgZ's node size and hpZ's group (default: LOCAL_WORLD_SIZE): with one host of 8 GPUs,
`--ranks-per-node 4` simulates 2 nodes. Runs on 1 GPU too: nothing is communicated there, and
ds-zero then gathers nothing either (a one-rank bucket is its own full copy), so its five
systems do the same work and their spread is the measurement's noise. A system that raises is recorded
with its error and the next one runs.

    torchrun --standalone --nproc_per_node=N benchmarks/zero/zeropp_multi_gpu.py [--layers 8]

`--cpu` runs the same flow with gloo on the CPU (fp32, for checking the harness with a tiny
model: `--layers 1 --dim 64 --heads 4 --seq 32 --vocab 128`); DeepSpeed's quantized systems need
its CUDA quantizer op and are GPU-only. The real DeepSpeed must be importable for the
`deepspeed-*` systems (not this project's `deepspeed` alias).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import traceback
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
    "deepspeed-z3": {},
    "deepspeed-zeropp": {"zero_quantized_weights": True, "zero_quantized_gradients": True,
                         "hpz": True},
}  # fmt: skip


class Trainer:
    """One system's model and step: ds-zero's wrapper or DeepSpeed's engine."""

    def __init__(self, name: str, kw: dict, args: argparse.Namespace, per_node: int) -> None:
        self.device = "cpu" if args.cpu else "cuda"
        dtype = torch.float32 if args.cpu else torch.bfloat16
        torch.manual_seed(0)
        model = GPT(args.vocab, args.d, args.layers, args.heads, args.seq).to(self.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        kw = dict(kw)
        self.hpz = per_node if kw.pop("hpz", False) else 1
        self.deepspeed = name.startswith("deepspeed")
        if self.deepspeed:
            import deepspeed

            if "+dsall" in deepspeed.__version__:
                raise RuntimeError(
                    f"the deepspeed-* systems need the real DeepSpeed 0.19.8; `deepspeed` here is "
                    f"this project's alias ({deepspeed.__version__}, {deepspeed.__file__}): run "
                    "them in an environment where the real one is importable"
                )
            config = {
                "train_micro_batch_size_per_gpu": args.batch,
                "gradient_accumulation_steps": 1,
                "bf16": {"enabled": dtype == torch.bfloat16},
                "zero_optimization": {"stage": 3, "zero_hpz_partition_size": self.hpz, **kw},
                "steps_per_print": 2**31,
            }
            self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        else:
            opts = ds_zero.ZeroOptions(
                stage=3, param_dtype=dtype, reduce_dtype=dtype,
                hpz_partition_size=self.hpz, ranks_per_node=per_node, **kw,
            )  # fmt: skip
            self.engine = ds_zero.wrap(model, optimizer, opts)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        loss = self.engine(x[:, :-1], x[:, 1:])
        self.engine.backward(loss)
        self.engine.step()
        return loss

    def close(self) -> None:
        if self.deepspeed:
            self.engine.destroy()
        else:
            self.engine.close()


def run_system(name: str, kw: dict, args: argparse.Namespace, per_node: int) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    t = Trainer(name, kw, args, per_node)
    cuda = t.device == "cuda"
    g = torch.Generator(device=t.device).manual_seed(rank)

    def step() -> torch.Tensor:
        x = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=t.device, generator=g)
        return t.step(x)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    chunks = max(1, min(args.chunks, args.steps))
    per_chunk = args.steps // chunks
    chunk_s = []
    for _ in range(chunks):
        t0 = time.perf_counter()
        for _ in range(per_chunk):
            loss = step()
        sync()
        chunk_s.append((time.perf_counter() - t0) / per_chunk)
    step_s = statistics.median(chunk_s)
    by_name: dict[str, int] | None = None
    if not t.deepspeed:  # ds-comm's logger sees our collectives only
        logger = ds_comm.get_comms_logger()
        logger.reset()
        logger.enable()
        step()
        logger.disable()
        by_name = {}
        for s in logger.stats():
            by_name[s.name] = by_name.get(s.name, 0) + s.total_bytes
        logger.reset()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    t.close()
    return {
        "system": name,
        "step_s": round(step_s, 5),
        "step_s_chunks": [round(c, 5) for c in chunk_s],
        "tokens_per_s": round(args.batch * args.seq * world / step_s, 1),
        "peak_mem_gb": None if peak is None else round(peak, 3),
        "bytes_per_step": by_name,
        "final_loss": round(float(loss.detach()), 4),
        "hpz_partition_size": t.hpz,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    # --dim, not --d: under torchrun, "--d" is an ambiguous prefix of its own options
    ap.add_argument("--dim", dest="d", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--chunks", type=int, default=3, help="timed chunks of the steps (median)")
    ap.add_argument("--ranks-per-node", type=int, default=None)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--cpu", action="store_true", help="gloo on the CPU, fp32 (harness check)")
    ap.add_argument("--out", default=None, help="results file or folder")
    args = ap.parse_args()
    # ours first: DeepSpeed's stage-3 engine replaces torch.nn.functional.linear with its own
    # autograd function for the rest of the process (destroy() leaves it), whose backward then
    # fails on parameters it did not partition
    names = sorted(args.systems.split(","), key=lambda n: n.startswith("deepspeed"))
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        ap.error(f"--systems: unknown {unknown}; choose from {', '.join(SYSTEMS)}")
    ds_comm.init_distributed(dist_backend="gloo" if args.cpu else None)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not args.cpu:
        torch.cuda.set_device(local)
    world = dist.get_world_size()
    per_node = args.ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    runs = []
    for name in names:
        try:
            runs.append(run_system(name, SYSTEMS[name], args, per_node))
        except Exception as e:  # noqa: BLE001  (recorded; the next system still runs)
            runs.append({"system": name, "step_s": None, "tokens_per_s": None,
                         "peak_mem_gb": None, "error": f"{type(e).__name__}: {e}"[:800]})  # fmt: skip
            print(f"rank {dist.get_rank()}: {name} failed: {traceback.format_exc()}", flush=True)
        gc.collect()
        if not args.cpu:
            torch.cuda.empty_cache()  # the previous system's buffers
    if dist.get_rank() == 0:
        ok = {r["system"]: r for r in runs if r.get("tokens_per_s")}
        ratios = {}
        for base_name in ("ds-zero-z3", "deepspeed-z3"):
            base = ok.get(base_name)
            if base is None:
                continue
            for r in ok.values():
                if r is base or r["system"].split("-")[0] != base_name.split("-")[0]:
                    continue
                ratios[f"{r['system']}/{base_name} tokens_per_s"] = round(
                    r["tokens_per_s"] / base["tokens_per_s"], 3
                )
                total = sum((r["bytes_per_step"] or {}).values())
                if total:
                    ratios[f"{base_name}/{r['system']} bytes_per_step"] = round(
                        sum(base["bytes_per_step"].values()) / total, 3
                    )
        for ours, theirs in (
            ("ds-zero-z3", "deepspeed-z3"),
            ("ds-zero-zeropp", "deepspeed-zeropp"),
        ):
            if ours in ok and theirs in ok:
                ratios[f"{ours}/{theirs} tokens_per_s"] = round(
                    ok[ours]["tokens_per_s"] / ok[theirs]["tokens_per_s"], 3
                )
        gpu = "cpu (gloo)" if args.cpu else torch.cuda.get_device_name()
        path = write_results(
            scenario="zeropp",
            device=f"{world} x {gpu}",
            runs=runs,
            ratios=ratios,
            path=args.out,
            config={**vars(args), "world": world, "ranks_per_node": per_node},
        )
        for r in runs:
            print(r)
        print(ratios)
        print(f"results: {path}")
    ds_comm.destroy_process_group()


if __name__ == "__main__":
    main()
