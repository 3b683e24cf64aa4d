"""The longest sequence a Llama-3.2-3B-shaped model trains at with ZeRO-3 + CPU offload.

    python benchmarks/seq/long_seq.py --systems deepspeed-alst ours hf-plain \
        --start 16384 --max-trials 6 --budget-s 110 --device-name 1xNVIDIA-H100

Systems (the model: ``LlamaConfig`` hidden 3072, 28 layers, 24 heads, 8 KV heads, intermediate
8192, vocab 128256, random weights, bf16, SDPA attention; embeddings untied (3.6B parameters:
DeepSpeed's TiledFusedLogitsLoss accumulates the lm_head gradient during forward, which ZeRO-3
then meets twice in one bucket when lm_head shares the embedding's weight); ZeRO stage 3 with
optimizer and parameters offloaded to the CPU, AdamW, clipping 1.0; micro-batch 1):

* ``ours``: ds_all's engine; ds_seq's Ulysses attention (sp = GPUs), ``enable_tiled_mlp``,
  ``tiled_causal_lm_loss_sum`` (TiledFusedLogitsLoss) and ``enable_checkpoint_offload``
  (activation checkpointing with the hidden states in pinned host memory).
* ``deepspeed-alst``: DeepSpeed 0.19.8's ALST path: ``UlyssesSPAttentionHF`` (at sp = 1 its
  ``register_with_transformers`` does nothing), ``TiledMLP`` patched into ``LlamaMLP`` as its
  docstring shows, ``TiledFusedLogitsLoss``, transformers' activation checkpointing under
  ``get_checkpoint_hidden_states_offloading_ctx_manager``.
* ``hf-plain``: the transformers model as is (logits and loss in the model, activation
  checkpointing on, no tiling, no offload of the checkpoints) under DeepSpeed ZeRO-3 offload,
  data parallel over the GPUs (no sequence parallelism).

Lengths: doubling from ``--start`` until a trial fails, then bisection (multiples of
``--granularity``) between the longest success and the shortest failure. Each trial is one
process group (``torchrun --nproc_per_node N``, sp = N for the first two systems) that builds the
model, trains ``--steps`` steps on random tokens and reports the tokens/s of the steps after the
first, peak GPU memory (max allocated, rank 0) and the failure (out of memory, timeout, error).
A system's search stops after ``--max-trials`` trials or ``--budget-s`` seconds (the first
trial always runs, up to ``--trial-timeout``; no later trial starts that the remaining budget
could not finish, judged by the last trial's wall time), so
``max_seq_len`` is a lower bound when ``bounded_by`` is not ``memory``. After the searches,
ours runs once at DeepSpeed's longest length if it has no trial there (for the tokens/s ratio)
when the budget allows.

The JSON (scenario ``long-seq``; ``benchmarks/results/`` and $OUT) is rewritten after every
trial. ``--tiny`` runs the same flow with a small model on the CPU (a smoke test).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the shared results writer
from _pythonpath import pythonpath  # noqa: E402
from _results import write_results  # noqa: E402

SYSTEMS = ("ours", "deepspeed-alst", "hf-plain")
HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, VOCAB = 3072, 28, 24, 8, 8192, 128256


# --------------------------------------------------------------------------------- the trial
def _llama_config(tiny: bool, seq_len: int):
    from transformers import LlamaConfig

    if tiny:
        dims = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=128, vocab_size=256)  # fmt: skip
    else:
        dims = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                    num_key_value_heads=KV_HEADS, intermediate_size=INTERMEDIATE, vocab_size=VOCAB)  # fmt: skip
    return LlamaConfig(**dims, max_position_embeddings=max(seq_len, 131072), rope_theta=500000.0,
                       tie_word_embeddings=False, attn_implementation="sdpa", use_cache=False)  # fmt: skip


def _build(cfg, device):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):  # random init on the device: seconds instead of minutes on the CPU
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    return model.train()


def _ds_config(sp: int, tiny: bool) -> dict:
    offload = {"device": "cpu", "pin_memory": not tiny}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "zero_optimization": {
            "stage": 3,
            "offload_optimizer": offload,
            "offload_param": offload,
            "overlap_comm": True,
            "contiguous_gradients": True,
        },  # fmt: skip
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "weight_decay": 0.0}},
        "gradient_clipping": 1.0,
        "sequence_parallel_size": sp,
        "steps_per_print": None,  # no progress lines (nor ds_all's FLOPs count)
    }


def _batch(seq_len: int, vocab: int, step: int, device):
    import torch

    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, vocab, (1, seq_len), generator=g)
    labels = torch.nn.functional.pad(ids, (0, 1), value=-100)[:, 1:]  # shifted, whole sequence
    return ids.to(device), torch.arange(seq_len)[None].to(device), labels.to(device)


def _shard(t, rank: int, sp: int):
    n = t.shape[1] // sp
    return t[:, rank * n : (rank + 1) * n]


def _train_ours(args, cfg, device, rank: int, world: int):
    from torch import nn

    import ds_all
    import ds_seq

    ds_all.init_distributed()  # the sequence-parallel groups are made before initialize()
    model = _build(cfg, device)
    mpu = None
    if world > 1:
        mpu = ds_seq.UlyssesSPAttentionHF.register_with_transformers(
            model, "sdpa", world, 1, seq_length_is_variable=True
        )
    ds_seq.enable_tiled_mlp(model)  # ceil(seq / hidden) tiles, as DeepSpeed's recipe
    ds_seq.enable_checkpoint_offload(model)

    class TiledLossLM(nn.Module):
        def __init__(self, lm: nn.Module) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, ids, pos, shift_labels):
            hidden = self.lm.model(
                input_ids=ids, position_ids=pos, use_cache=False
            ).last_hidden_state
            return ds_seq.tiled_causal_lm_loss_sum(self.lm.lm_head, hidden, shift_labels)

    engine, *_ = ds_all.initialize(
        model=TiledLossLM(model), config=_ds_config(world, args.tiny), mpu=mpu
    )
    group = mpu.get_sequence_parallel_group() if mpu is not None else None

    def step(i: int) -> float:
        ids, pos, labels = (
            _shard(t, rank, world) for t in _batch(args.seq_len, cfg.vocab_size, i, device)
        )
        total, count = engine(ids, pos, labels)
        loss = ds_seq.sequence_parallel_loss(total, count, group)
        engine.backward(loss)
        engine.step()
        return float(loss)

    return step


def _patch_deepspeed_tiled_mlp(world: int) -> None:
    """DeepSpeed's TiledMLP into LlamaMLP, as TiledMLP's docstring shows (a class patch)."""
    import deepspeed.comm as ds_dist
    import torch
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP
    from transformers.models.llama import modeling_llama

    def tiled_mlp_forward(self, x):
        num_shards = math.ceil(x.shape[-2] / x.shape[-1])
        tensor = torch.tensor(num_shards, device=x.device)
        if world > 1:
            ds_dist.all_reduce(tensor, op=ds_dist.ReduceOp.MAX)  # every rank the same tile count
        compute_params = [self.down_proj.weight, self.gate_proj.weight, self.up_proj.weight]

        def mlp_forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

        return TiledMLP.apply(mlp_forward, self, x, int(tensor.item()), compute_params)

    modeling_llama.LlamaMLP.forward = tiled_mlp_forward


def _train_deepspeed(args, cfg, device, rank: int, world: int, alst: bool):
    import deepspeed
    import torch
    from torch import nn

    deepspeed.init_distributed()
    model = _build(cfg, device)
    mpu = None
    if alst:
        from deepspeed.runtime.activation_checkpointing.offload_activations import (
            get_checkpoint_hidden_states_offloading_ctx_manager,
        )
        from deepspeed.runtime.sequence_parallel.ulysses_sp import (
            TiledFusedLogitsLoss,
            UlyssesSPAttentionHF,
        )

        mpu = UlyssesSPAttentionHF.register_with_transformers(
            model, "sdpa", world, 1, seq_length_is_variable=True
        )  # None at sp = 1
        _patch_deepspeed_tiled_mlp(world)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    sp = world if alst else 1

    class Wrapped(nn.Module):
        def __init__(self, lm: nn.Module) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, ids, pos, shift_labels):
            if not alst:
                return self.lm(input_ids=ids, position_ids=pos, labels=ids, use_cache=False).loss
            hidden = self.lm.model(
                input_ids=ids, position_ids=pos, use_cache=False
            ).last_hidden_state
            head = self.lm.lm_head
            shards = max(1, math.ceil(hidden.shape[1] * cfg.vocab_size * 4 / 2**30))

            def loss_fn(self, x, y):
                return torch.nn.functional.cross_entropy(
                    self(x).float(), y, ignore_index=-100, reduction="sum"
                )

            total = TiledFusedLogitsLoss.apply(
                loss_fn, head, hidden, shift_labels, None, shards, [head.weight], "sum"
            )
            return total, (shift_labels != -100).sum()

    config = _ds_config(sp, args.tiny)
    if not alst:
        config.pop("sequence_parallel_size")
    wrapped = Wrapped(model)
    engine, *_ = deepspeed.initialize(
        model=wrapped, model_parameters=wrapped.parameters(), config=config, mpu=mpu
    )

    def step(i: int) -> float:
        ids, pos, labels = _batch(args.seq_len, cfg.vocab_size, i, device)
        if sp > 1:
            ids, pos, labels = (_shard(t, rank, sp) for t in (ids, pos, labels))
        if not alst:
            loss = engine(ids, pos, labels)
            engine.backward(loss)
            engine.step()
            return float(loss)
        with get_checkpoint_hidden_states_offloading_ctx_manager():
            total, count = engine(ids, pos, labels)
            if sp > 1:  # ALST's recipe: all-gather the shards' sums and counts
                import torch.distributed.nn.functional as dnn

                group = mpu.get_sequence_parallel_group()
                totals = dnn.all_gather(total, group=group)
                counts = dnn.all_gather(count.float(), group=group)
                loss = sum(totals) / max(sum(counts), 1.0)
            else:
                loss = total / count.clamp(min=1)
            engine.backward(loss)
        engine.step()
        return float(loss)

    return step


def run_trial(args) -> None:
    """One length, inside torchrun: prints ``RESULT {json}`` on rank 0."""
    import torch

    if sys.platform == "linux":  # die with torchrun, whatever kills it
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if args.tiny:
        device = torch.device("cpu")
    else:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    cfg = _llama_config(args.tiny, args.seq_len)
    t0 = time.perf_counter()
    if args.trial == "ours":
        step = _train_ours(args, cfg, device, rank, world)
    else:
        step = _train_deepspeed(args, cfg, device, rank, world, alst=args.trial == "deepspeed-alst")
    build_s = time.perf_counter() - t0
    times, losses = [], []
    for i in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        s = time.perf_counter()
        losses.append(step(i))
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - s)
    timed = times[1:] or times
    step_s = sum(timed) / len(timed)
    dp = world if args.trial == "hf-plain" else 1  # hf-plain: one whole sequence per GPU
    out = {
        "seq_len": args.seq_len, "step_s": round(step_s, 3),
        "tokens_per_s": round(args.seq_len * dp / step_s, 1),
        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 2**30, 2) if device.type == "cuda" else None,
        "build_s": round(build_s, 1), "step_times_s": [round(t, 3) for t in times],
        "losses": [round(v, 4) for v in losses],
    }  # fmt: skip
    if rank == 0:
        print("RESULT " + json.dumps(out), flush=True)


# -------------------------------------------------------------------------------- the search
def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every descendant (torchrun puts its workers in sessions of their own,
    so killing its process group is not enough)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, found = [pid], []
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    for p in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def _trial(system: str, seq_len: int, args, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           str(Path(__file__).resolve()), "--trial", system, "--seq-len", str(seq_len), "--steps", str(args.steps)]  # fmt: skip
    if args.tiny:
        cmd.append("--tiny")
    env = dict(os.environ)
    env["PYTHONPATH"] = pythonpath(alias=False)  # DeepSpeed's ALST trials import the real one
    env.setdefault(
        "PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"
    )  # ALST's advice, all systems
    if args.tiny:
        env["DS_ACCELERATOR"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    t0 = time.monotonic()
    # own session: a timeout kills torchrun and every rank it started
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
        failure = None if proc.returncode == 0 else "error"
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        out, _ = proc.communicate()
        failure = "timeout"
    except BaseException:  # interrupted (SIGTERM/SIGINT): leave no trial running
        _kill_tree(proc.pid)
        raise
    wall = round(time.monotonic() - t0, 1)
    for line in (out or "").splitlines():
        if line.startswith("RESULT ") and failure is None:
            return {**json.loads(line[7:]), "ok": True, "wall_s": wall}
    text = out or ""
    if failure != "timeout" and ("out of memory" in text.lower() or "OutOfMemoryError" in text):
        failure = "oom"
    # the ranks' own error lines (torchrun's summary ends the output and says little)
    errors = [
        ln
        for ln in text.splitlines()
        if ("Error" in ln or "error:" in ln) and "ChildFailedError" not in ln
    ]
    return {"seq_len": seq_len, "ok": False, "failure": failure or "error", "wall_s": wall,
            "tail": "\n".join(dict.fromkeys(errors[:8])) or text[-1500:]}  # fmt: skip


def search(system: str, args, budget_s: float, log) -> dict:
    """Doubling then bisection within ``args.max_trials`` trials and ``budget_s`` seconds."""
    deadline = time.monotonic() + budget_s
    trials: list[dict] = []
    best: dict | None = None
    low_fail: int | None = None
    length = args.start
    bounded_by = "trials"
    last_wall = 0.0
    while len(trials) < args.max_trials:
        if length > args.max_len:
            bounded_by = "max_len"
            break
        remaining = deadline - time.monotonic()
        if trials and (remaining < max(30.0, last_wall) or remaining <= 0):
            bounded_by = "budget"
            break
        # the first trial always gets --trial-timeout (building the model and the offload state
        # takes its time); later ones only what the budget has left
        res = _trial(
            system,
            length,
            args,
            timeout=args.trial_timeout if not trials else min(args.trial_timeout, remaining),
        )
        trials.append(res)
        last_wall = res["wall_s"]
        log(system, res)
        if res["ok"]:
            best = res
        elif res["failure"] == "timeout":
            bounded_by = "budget"  # too slow to tell whether longer fits: stop here
            break
        else:
            low_fail = length if low_fail is None else min(low_fail, length)
        good = best["seq_len"] if best else 0
        if low_fail is None:
            length *= 2
            continue
        if best is None and low_fail <= args.granularity:
            bounded_by = "memory"
            break
        mid = (good + low_fail) // 2 // args.granularity * args.granularity
        if mid <= good or low_fail - good <= args.granularity:
            bounded_by = "memory"
            break
        length = mid
    return {"system": system, "best": best, "trials": trials, "bounded_by": bounded_by}


def _run_entry(found: dict) -> dict:
    best = found["best"]
    run = {"system": found["system"], "bounded_by": found["bounded_by"],
           "trials": [{k: v for k, v in t.items() if k != "tail"} | ({"tail": t["tail"][-400:]} if "tail" in t else {})
                      for t in found["trials"]]}  # fmt: skip
    if best is None:
        run.update(max_seq_len=None, tokens_per_s=None, peak_mem_gb=None,
                   error="no length trained" + (f": {found['trials'][0].get('failure')}" if found["trials"] else ""))  # fmt: skip
    else:
        run.update(max_seq_len=best["seq_len"], step_s=best["step_s"], tokens_per_s=best["tokens_per_s"],
                   peak_mem_gb=best["peak_mem_gb"])  # fmt: skip
    return run


def _ratios(found: dict[str, dict]) -> dict:
    ratios: dict[str, float] = {}

    def longest(s: str) -> int | None:
        b = found.get(s, {}).get("best")
        return b["seq_len"] if b else None

    ours = longest("ours")
    for peer in ("deepspeed-alst", "hf-plain"):
        theirs = longest(peer)
        if ours and theirs:
            ratios[f"ours/{peer} max_seq_len"] = round(ours / theirs, 3)
    ds = found.get("deepspeed-alst", {}).get("best")
    if ds and "ours" in found:
        same = [t for t in found["ours"]["trials"] if t["ok"] and t["seq_len"] == ds["seq_len"]]
        if same:
            ratios[f"ours/deepspeed-alst tokens_per_s at {ds['seq_len']}"] = round(
                same[-1]["tokens_per_s"] / ds["tokens_per_s"], 3
            )
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--systems", nargs="+", default=["deepspeed-alst", "ours", "hf-plain"], choices=SYSTEMS
    )
    ap.add_argument("--start", type=int, default=16384, help="first length tried (tokens)")
    ap.add_argument("--granularity", type=int, default=4096, help="bisection step (tokens)")
    ap.add_argument("--max-len", type=int, default=4 * 1024 * 1024)
    ap.add_argument("--max-trials", type=int, default=6, help="trials per system")
    ap.add_argument("--budget-s", type=float, default=600.0, help="seconds per system's search")
    ap.add_argument("--trial-timeout", type=float, default=540.0, help="seconds per trial")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--nproc", type=int, default=1, help="GPUs: sp = N for ours and deepspeed-alst")
    ap.add_argument("--device-name", default=None)
    ap.add_argument("--out", default=None, help="results path (default benchmarks/results/...)")
    ap.add_argument("--tiny", action="store_true", help="a small model on the CPU (smoke test)")
    ap.add_argument("--trial", choices=SYSTEMS, help=argparse.SUPPRESS)
    ap.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trial:
        run_trial(args)
        return
    # a SIGTERM (a time limit) unwinds like Ctrl-C, so the running trial is killed too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.start % args.nproc or args.granularity % args.nproc:
        ap.error(f"--start and --granularity must be multiples of --nproc ({args.nproc})")
    device = args.device_name or (
        f"{os.cpu_count()}-core CPU (tiny model)" if args.tiny else f"{args.nproc} x GPU"
    )
    found: dict[str, dict] = {}

    def log(system: str, res: dict) -> None:
        status = "ok" if res["ok"] else res["failure"]
        extra = f"{res['tokens_per_s']} tok/s, {res['peak_mem_gb']} GB" if res["ok"] else ""
        print(
            f"[long-seq] {system} {res['seq_len']}: {status} in {res['wall_s']} s {extra}",
            flush=True,
        )
        write()

    def write() -> None:
        runs = [_run_entry(f) for f in found.values()]
        if not runs:
            return
        write_results(
            scenario="long-seq", device=device, runs=runs, ratios=_ratios(found), path=args.out, metric="max_seq_len",
            config={"model": "Llama-3.2-3B shape" if not args.tiny else "tiny Llama", "nproc": args.nproc,
                    "sp": args.nproc, "steps": args.steps, "start": args.start, "granularity": args.granularity,
                    "max_trials": args.max_trials, "budget_s": args.budget_s,
                    "zero": "stage 3, offload_optimizer + offload_param cpu, bf16, AdamW"},
        )  # fmt: skip

    for system in args.systems:
        found[system] = {"system": system, "best": None, "trials": [], "bounded_by": "budget"}
        found[system] = search(system, args, args.budget_s, log)
        write()
    ds, ours = found.get("deepspeed-alst", {}).get("best"), found.get("ours")
    if ds and ours and not any(t["ok"] and t["seq_len"] == ds["seq_len"] for t in ours["trials"]):
        res = _trial("ours", ds["seq_len"], args, timeout=args.trial_timeout)
        ours["trials"].append(res)
        log("ours", res)
    write()


if __name__ == "__main__":
    main()
