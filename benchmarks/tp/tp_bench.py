"""Tensor-parallel training step: ds-tp's AutoTP against DeepSpeed's AutoTP and torch DTensor.

Two scenarios, each system measured in the same session on the same machine:

``overhead`` (one GPU): the cost of ds-tp's wrappers at tp=1. A Llama-shaped
``transformers`` model (no download) trains in bf16 with AdamW, once as built and once after
``ds_tp.autotp(model, None, preset_model="llama")`` replaced its projections by the
column/row-parallel layers (no collectives at tp=1). Goal: the wrapped step within 2 % of the
plain one (``ratios["plain/ds-tp-tp1 step_s"]`` >= 0.98; above 1 favours ds-tp, as every ratio).

``tp`` (N GPUs, N >= 2): the same model at tp=N (dp=1), one torchrun per system:
``ds-tp`` (``ds_all.initialize`` with ``tensor_parallel.autotp_size: N``, ZeRO stage 0, bf16),
``deepspeed`` (DeepSpeed's AutoTP training with the same config; skipped when DeepSpeed is not
importable) and ``dtensor`` (``torch.distributed.tensor.parallel.parallelize_module`` with
Colwise/Rowwise plans on the same projections, plain AdamW).

    python benchmarks/tp/tp_bench.py overhead             # one GPU (--tiny: CPU smoke run)
    python benchmarks/tp/tp_bench.py tp --nproc 8         # N GPUs of one host

Results: benchmarks/results/tp-<scenario>-<device>-<date>.json (and $OUT), the shared schema.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _pythonpath import pythonpath  # noqa: E402

MODEL = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
             num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=4096)  # fmt: skip
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip


def _model(tiny: bool, dtype):
    import torch
    import transformers as tf

    cfg = tf.LlamaConfig(**(TINY if tiny else MODEL), attn_implementation="sdpa")
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(cfg).to(dtype)


def _device():
    import torch

    if torch.cuda.is_available():
        return torch.device(
            "cuda", int(os.environ.get("LOCAL_RANK", 0))
        ), torch.cuda.get_device_name()
    return torch.device("cpu"), "cpu"


def _time_steps(step, warmup: int, steps: int, device) -> float:
    import torch

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def _peak_gb(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def run_overhead(args) -> None:
    import torch
    from _results import write_results

    import ds_tp

    device, name = _device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    b, s = (args.batch, args.seq) if not args.tiny else (2, 32)
    vocab = (TINY if args.tiny else MODEL)["vocab_size"]
    ids = torch.randint(0, vocab, (b, s), device=device)
    runs = []
    # alternate the systems over rounds so drift (clocks, thermals) hits both alike
    times: dict[str, list[float]] = {"plain": [], "ds-tp-tp1": []}
    models = {}
    for system in times:
        m = _model(args.tiny, dtype).to(device)
        if system != "plain":
            ds_tp.autotp(m, None, preset_model="llama")
        opt = torch.optim.AdamW(m.parameters(), lr=1e-5, fused=device.type == "cuda")
        models[system] = (m, opt)

    def stepper(system):
        m, opt = models[system]

        def step():
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    peaks: dict[str, float | None] = {}
    for _ in range(args.rounds):
        for system in times:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times[system].append(_time_steps(stepper(system), args.warmup, args.steps, device))
            peak = _peak_gb(
                device
            )  # both models stay resident: the peak includes the other's weights
            peaks[system] = None if peak is None else max(peak, peaks.get(system) or 0.0)
    for system, ts in times.items():
        step_s = sorted(ts)[len(ts) // 2]  # median round
        runs.append({"system": system, "step_s": step_s, "tokens_per_s": b * s / step_s,
                     "peak_mem_gb": peaks[system], "rounds_s": ts})  # fmt: skip
    ratio = runs[0]["step_s"] / runs[1]["step_s"]
    path = write_results(
        scenario="tp-overhead", device=f"1 x {name}", runs=runs,
        ratios={"plain/ds-tp-tp1 step_s": ratio},
        config={"model": TINY if args.tiny else MODEL, "batch": b, "seq": s, "dtype": str(dtype),
                "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds,
                "goal": "plain/ds-tp-tp1 step_s >= 0.98"},
        path=args.out,
    )  # fmt: skip
    print(json.dumps({r["system"]: r["step_s"] for r in runs}), f"ratio {ratio:.4f}", path)


# ------------------------------------------------------------------- tp=N, one torchrun per system
def _clip_dtensor(model, max_norm: float, device) -> None:
    """clip_grad_norm_ over a model mixing DTensor (sharded) and plain (replicated) gradients,
    which torch's refuses: sharded squares summed over the group, replicated ones once."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    sharded = torch.zeros((), device=device)
    replicated = torch.zeros((), device=device)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    for g in grads:
        if isinstance(g, DTensor):
            sharded += g.to_local().float().pow(2).sum()
        else:
            replicated += g.float().pow(2).sum()
    dist.all_reduce(sharded)
    coef = float((max_norm / ((sharded + replicated).sqrt() + 1e-6)).clamp(max=1.0))
    for g in grads:
        g.mul_(coef)


def _worker(args) -> None:
    import torch
    import torch.distributed as dist

    device, _ = _device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    n = dist.get_world_size()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    b, s = (args.batch, args.seq) if not args.tiny else (2, 32)
    vocab = (TINY if args.tiny else MODEL)["vocab_size"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (b, s), generator=g).to(device)  # same batch on every TP rank
    model = _model(args.tiny, torch.float32 if args.system != "dtensor" else dtype)
    cfg = {"train_micro_batch_size_per_gpu": b, "gradient_accumulation_steps": 1,
           "gradient_clipping": 1.0, "zero_optimization": {"stage": 0},
           "bf16": {"enabled": device.type == "cuda"},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}},
           "tensor_parallel": {"autotp_size": n, "preset_model": "llama"}}  # fmt: skip
    if args.system == "dtensor":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            parallelize_module,
        )

        mesh = init_device_mesh(device.type, (n,))
        plan = {}
        for i in range(len(model.model.layers)):
            p = f"model.layers.{i}."
            plan.update({p + "self_attn.q_proj": ColwiseParallel(), p + "self_attn.k_proj": ColwiseParallel(),
                         p + "self_attn.v_proj": ColwiseParallel(), p + "self_attn.o_proj": RowwiseParallel(),
                         p + "mlp.gate_proj": ColwiseParallel(), p + "mlp.up_proj": ColwiseParallel(),
                         p + "mlp.down_proj": RowwiseParallel()})  # fmt: skip
        model = parallelize_module(model.to(device), mesh, plan)
        import copy

        local = copy.copy(model.config)  # attention reshapes read the local head counts
        local.num_attention_heads //= n
        local.num_key_value_heads //= n
        for layer in model.model.layers:
            layer.self_attn.config = local
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            _clip_dtensor(model, 1.0, device)
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        if args.system == "deepspeed":
            import deepspeed as engine_lib

            if "ds-deepspeed" in str(engine_lib.__file__):
                raise RuntimeError("deepspeed is ds-deepspeed's alias of ds_all; install DeepSpeed")
        else:
            import ds_all as engine_lib
        engine, _, _, _ = engine_lib.initialize(
            model=model, model_parameters=model.parameters(), config=cfg
        )

        def step():
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_s = _time_steps(step, args.warmup, args.steps, device)
    peak = _peak_gb(device)
    peaks = [None] * n
    dist.all_gather_object(peaks, peak)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps({"system": args.system, "step_s": step_s, "tokens_per_s": b * s / step_s,
                                      "peak_mem_gb": max(p or 0 for p in peaks) if peak is not None else None}))  # fmt: skip
    dist.destroy_process_group()


def run_tp(args) -> None:
    from _results import write_results

    _, name = _device()
    runs = []
    for system in ("ds-tp", "deepspeed", "dtensor"):
        # the real DeepSpeed for its system, never ds-deepspeed's alias of ds_all
        env = dict(os.environ, PYTHONPATH=pythonpath(alias=system != "deepspeed"))
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                __file__, "worker", "--system", system, "--batch", str(args.batch), "--seq", str(args.seq),
                "--warmup", str(args.warmup), "--steps", str(args.steps)] + (["--tiny"] if args.tiny else [])  # fmt: skip
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=args.timeout)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode == 0 and lines:
            runs.append(json.loads(lines[-1][7:]))
        else:
            text = (proc.stderr + proc.stdout).splitlines()
            errors = [ln for ln in text if "Error" in ln and "elastic" not in ln] or text[-3:]
            runs.append({"system": system, "peak_mem_gb": None, "error": errors[-1][-400:]})
    by = {r["system"]: r for r in runs if "step_s" in r}
    ratios = {f"ds-tp/{peer} tokens_per_s": by["ds-tp"]["tokens_per_s"] / by[peer]["tokens_per_s"]
              for peer in ("deepspeed", "dtensor") if "ds-tp" in by and peer in by}  # fmt: skip
    path = write_results(
        scenario="tp", device=f"{args.nproc} x {name}", runs=runs, ratios=ratios,
        config={"model": TINY if args.tiny else MODEL, "batch": args.batch, "seq": args.seq, "tp": args.nproc,
                "warmup": args.warmup, "steps": args.steps},
        path=args.out,
    )  # fmt: skip
    print(json.dumps(runs), path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("scenario", choices=["overhead", "tp", "worker"])
    ap.add_argument("--system", default="ds-tp")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--tiny", action="store_true", help="a tiny model (CPU smoke run)")
    ap.add_argument("--out", default=None, help="results path (default benchmarks/results/...)")
    args = ap.parse_args()
    {"overhead": run_overhead, "tp": run_tp, "worker": _worker}[args.scenario](args)


if __name__ == "__main__":
    main()
