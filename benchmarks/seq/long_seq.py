"""The longest sequence a Llama-3.2-3B-shaped model trains at with ZeRO-3 + CPU offload.

    python benchmarks/seq/long_seq.py --systems deepspeed-alst ours hf-plain \
        --start 16384 --budget-s 170 --total-s 540 --device-name 1xNVIDIA-H100

Systems (the model: ``LlamaConfig`` hidden 3072, 28 layers, 24 heads, 8 KV heads, intermediate
8192, vocab 128256, random weights, bf16, SDPA attention; embeddings untied (3.6B parameters:
DeepSpeed's TiledFusedLogitsLoss accumulates the lm_head gradient during forward, which ZeRO-3
then meets twice in one bucket when lm_head shares the embedding's weight); ZeRO stage 3 with
optimizer and parameters offloaded to the CPU, AdamW, clipping 1.0; micro-batch 1):

* ``ours``: ds_all's engine; ds_seq's Ulysses attention (sp = GPUs), ``enable_tiled_mlp``,
  ``tiled_causal_lm_loss_sum`` (TiledFusedLogitsLoss) and ``enable_checkpoint_offload``
  (activation checkpointing with the hidden states in pinned host memory; with
  ``--ours-keep-gb G``, up to G GB of them per step stay on the device).
* ``deepspeed-alst``: DeepSpeed 0.19.8's ALST path: ``UlyssesSPAttentionHF`` (at sp = 1 its
  ``register_with_transformers`` does nothing), ``TiledMLP`` patched into ``LlamaMLP`` as its
  docstring shows, ``TiledFusedLogitsLoss``, transformers' activation checkpointing under
  ``get_checkpoint_hidden_states_offloading_ctx_manager``.
* ``hf-plain``: the transformers model as is (logits and loss in the model, activation
  checkpointing on, no tiling, no offload of the checkpoints) under DeepSpeed ZeRO-3 offload,
  data parallel over the GPUs (no sequence parallelism).

The search, per system, within ``--budget-s`` seconds (model build included):

1. One process group (``torchrun --nproc_per_node N``, sp = N for the first two systems) builds
   the model and the engine once and trains ``--steps`` steps at each length of the ladder
   ``--start``, 2x, 4x, ... in turn (``--ladder-step N``: ``--start``, +N, +2N, ..., for a
   search near a known bound: one build for every length). Before each length it frees what the last one left
   (ds-seq's pooled host buffers, the CUDA caches, torch's pinned-memory cache) and resets the
   peak counters, so each length's ``peak_mem_gb`` (max allocated, rank 0) is its own; memory
   left fragmented by shorter lengths can only make a length fail sooner. It stops at the first
   failure (out of device memory, killed: host memory, error), or before a length whose
   predicted time (the last length's, scaled by the measured growth, quadratic before two
   lengths are known) would overrun the budget, or at ``--max-len``.
2. After an out-of-memory failure, fresh processes bisect (multiples of ``--granularity``)
   between the longest success and the failure while the budget allows (each needs a build).

``max_seq_len`` is the longest length that trained ``--steps`` steps; ``bounded_by`` says what
ended the search: ``memory`` (the next length failed, within ``--granularity``), ``budget``
(time: ``max_seq_len`` is a lower bound; ``limit_between`` brackets the limit when a failure
was seen), ``max_len`` or ``trials``. Each run also carries a projection (``projected``: where
the device and host memory measured at the last two lengths of the ladder, extrapolated
linearly, would run out), labelled as such; the ratios of measured lengths never use it.
After the searches, ours trains at DeepSpeed's longest length if it has no trial there (for the
tokens/s ratio), within ``--total-s``. ``--merge`` keeps the other systems' runs of the
``--out`` file, so that each system can have a 10-minute command of its own (same machine, same
session), e.g. started near the first command's projection:
``--systems ours --start 262144 --budget-s 540 --total-s 540 --merge --out FILE``.

Budgets: on one H100 (2026-12-06) building took 28 s (ours), 80 s (DeepSpeed ALST) and 34 s
(hf-plain) and 3 steps at 16K took 9 s, 23 s and 11 s; a step's time then grows about
quadratically with the length (attention), so 170 s per system reaches about 64K for ours and
32K-64K for DeepSpeed: at that budget, memory bounds only a system that runs out early (plain
transformers). ``--total-s`` (default 540) keeps the three searches and the tokens/s trial in
one 10-minute command: each system gets at most its share of what is left.

The JSON (scenario ``long-seq``; ``benchmarks/results/`` and $OUT) is rewritten after every
length, and a PNG of every trial's peak memory and tokens/s drawn beside it at the end
(``--chart FILE`` redraws it from a results file). ``--tiny`` runs the same flow with a small
model on the CPU (a smoke test).
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
    # --ours-keep-gb: that many GB of layer inputs per step stay on the device (the first
    # layers'), where the device has room and the host would otherwise bound the length
    keep = int(getattr(args, "ours_keep_gb", 0.0) * 2**30)
    offload = ds_seq.enable_checkpoint_offload(
        model, ds_seq.HiddenStatesOffload(keep_on_device_bytes=keep)
    )

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

    # the host buffers of one length's hidden states are pooled for the next step; a new
    # length needs new shapes
    return step, offload.release_buffers


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

    return step, None  # ALST's offload engine is made per step: nothing is pooled across steps


def _emit(rank: int, kind: str, payload: dict) -> None:
    """A line for the parent (rank 0 only): ``KIND {json}``."""
    if rank == 0:
        print(f"{kind} {json.dumps(payload)}", flush=True)


def _host_memory() -> dict:
    """Host memory available (MemAvailable) and this process's resident set, in GB."""
    out: dict[str, float] = {}
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                out["host_available_gb"] = round(int(line.split()[1]) / 2**20, 2)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["host_rss_gb"] = round(int(line.split()[1]) / 2**20, 2)
    return out


def _fresh_memory(release, device) -> None:
    """Before a length: free what the last one left and reset the peak counters."""
    import gc

    import torch

    if release is not None:
        release()
    gc.collect()
    if device.type != "cuda":
        return
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    # page-locked blocks of the last length's shapes, cached by torch's pinned allocator
    for fn in (getattr(getattr(torch, "accelerator", None), "empty_host_cache", None),
               getattr(torch._C, "_accelerator_emptyHostCache", None),
               getattr(torch._C, "_host_emptyCache", None)):  # fmt: skip
        if callable(fn):
            with contextlib.suppress(RuntimeError):
                fn()
            break
    torch.cuda.reset_peak_memory_stats()


def _predict_s(done: list[tuple[int, float]], length: int) -> float:
    """Seconds the steps at ``length`` will take, from the lengths done: the last one's time
    scaled by (length / its length) ** growth, where growth is measured from the last two
    (clamped to [1, 2]) and 2 (attention's quadratic term) before two are known."""
    (l1, t1) = done[-1]
    growth = 2.0
    if len(done) > 1:
        l0, t0 = done[-2]
        if t0 > 0 and l1 > l0:
            growth = min(2.0, max(1.0, math.log(t1 / t0) / math.log(l1 / l0)))
    return t1 * (length / l1) ** growth


def _rank0_decides(flag: bool, device) -> bool:
    """Rank 0's ``flag`` on every rank: a length is started by all ranks or by none (each rank
    times its own steps, so their predictions may differ at the margin)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.broadcast(t, 0)
    return bool(t.item())


def run_trial(args) -> None:
    """A ladder of lengths in one process group, inside torchrun: prints ``BUILD``, then per
    length ``START`` and ``RESULT`` or ``FAIL`` (out of memory), or ``STOP`` (no time left),
    each ``KIND {json}`` on rank 0."""
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
    lengths = list(args.lengths)
    cfg = _llama_config(args.tiny, max(lengths))
    t0 = time.perf_counter()
    args.seq_len = lengths[0]
    if args.trial == "ours":
        step, release = _train_ours(args, cfg, device, rank, world)
    else:
        step, release = _train_deepspeed(
            args, cfg, device, rank, world, alst=args.trial == "deepspeed-alst"
        )
    build_s = time.perf_counter() - t0
    total_gb = (
        round(torch.cuda.get_device_properties(device).total_memory / 2**30, 2)
        if device.type == "cuda"
        else None
    )
    _emit(rank, "BUILD", {"build_s": round(build_s, 1), "device_total_gb": total_gb})
    done: list[tuple[int, float]] = []
    for index, length in enumerate(lengths):
        if done and args.deadline:
            predicted = _predict_s(done, length)
            if _rank0_decides(time.time() + predicted > args.deadline, device):
                _emit(rank, "STOP", {"seq_len": length, "reason": "budget",
                                     "predicted_s": round(predicted, 1)})  # fmt: skip
                return
        args.seq_len = length  # the step functions read it at every call
        _fresh_memory(release if index else None, device)
        _emit(rank, "START", {"seq_len": length})
        times, losses = [], []
        try:
            if args.tiny and args.simulate_oom_at and length >= args.simulate_oom_at:
                raise torch.OutOfMemoryError(f"simulated: --simulate-oom-at {args.simulate_oom_at}")
            for i in range(args.steps):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                s = time.perf_counter()
                losses.append(step(i))
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - s)
        except torch.OutOfMemoryError as exc:
            _emit(rank, "FAIL", {"seq_len": length, "failure": "oom",
                                 "message": str(exc).splitlines()[0][:300]})  # fmt: skip
            sys.stdout.flush()
            # the engine's state after an OOM is not to be trusted, and the other ranks may
            # wait in a collective: end the whole process group now
            os._exit(3)
        timed = times[1:] or times
        step_s = sum(timed) / len(timed)
        dp = world if args.trial == "hf-plain" else 1  # hf-plain: one whole sequence per GPU
        cuda = device.type == "cuda"
        out = {
            "seq_len": length, "step_s": round(step_s, 3),
            "tokens_per_s": round(length * dp / step_s, 1),
            "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
            **_host_memory(), "build_s": round(build_s, 1), "in_process_index": index,
            "step_times_s": [round(t, 3) for t in times], "losses": [round(v, 4) for v in losses],
        }  # fmt: skip
        _emit(rank, "RESULT", out)
        done.append((length, sum(times)))


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


def _parse(line: str) -> tuple[str, dict] | None:
    kind, _, rest = line.partition(" ")
    if kind in ("BUILD", "START", "RESULT", "FAIL", "STOP") and rest.startswith("{"):
        with contextlib.suppress(json.JSONDecodeError):
            return kind, json.loads(rest)
    return None


def _error_lines(text: str) -> str:
    # the ranks' own error lines (torchrun's summary ends the output and says little)
    errors = [ln for ln in text.splitlines()
              if ("Error" in ln or "error:" in ln or "Killed" in ln) and "ChildFailedError" not in ln]  # fmt: skip
    return "\n".join(dict.fromkeys(errors[:8])) or text[-1500:]


def _process(system: str, lengths: list[int], args, timeout: float,
             deadline: float | None) -> dict:  # fmt: skip
    """One process group over ``lengths``: its trials (one per length it started), its build
    time, and why it ended (None: every length done)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           str(Path(__file__).resolve()), "--trial", system, "--steps", str(args.steps),
           "--lengths", *map(str, lengths)]  # fmt: skip
    if deadline is not None:
        cmd += ["--deadline", f"{deadline:.1f}"]
    if system == "ours" and args.ours_keep_gb:
        cmd += ["--ours-keep-gb", str(args.ours_keep_gb)]
    if args.tiny:
        cmd.append("--tiny")
        if args.simulate_oom_at:
            cmd += ["--simulate-oom-at", str(args.simulate_oom_at)]
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
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        out, _ = proc.communicate()
        timed_out = True
    except BaseException:  # interrupted (SIGTERM/SIGINT): leave no trial running
        _kill_tree(proc.pid)
        raise
    wall = round(time.monotonic() - t0, 1)
    text = out or ""
    trials: list[dict] = []
    build_s, total_gb, started, stop = None, None, None, None
    for line in text.splitlines():
        parsed = _parse(line)
        if parsed is None:
            continue
        kind, payload = parsed
        if kind == "BUILD":
            build_s, total_gb = payload["build_s"], payload.get("device_total_gb")
        elif kind == "START":
            started = payload["seq_len"]
        elif kind == "RESULT":
            trials.append({**payload, "ok": True})
            started = None
        elif kind == "FAIL":
            trials.append({"seq_len": payload["seq_len"], "ok": False, "failure": payload["failure"],
                           "tail": payload.get("message", "")})  # fmt: skip
            started = None
        elif kind == "STOP":
            stop = payload
    ended = None
    if started is not None:  # a length that neither finished nor reported a failure
        if timed_out:
            failure = "timeout"
        elif "out of memory" in text.lower() or "OutOfMemoryError" in text:
            failure = "oom"
        elif proc.returncode in (-9, 137) or "Signals.SIGKILL" in text or "exitcode  : -9" in text:
            failure = "killed"  # the kernel's OOM killer: host memory
        else:
            failure = "error"
        trials.append({"seq_len": started, "ok": False, "failure": failure,
                       "tail": _error_lines(text)})  # fmt: skip
    elif build_s is None:  # died before the first length
        ended = "timeout" if timed_out else "error"
        trials.append(
            {"seq_len": lengths[0], "ok": False, "failure": ended, "tail": _error_lines(text)}
        )
    if trials and not trials[-1]["ok"]:
        ended = trials[-1]["failure"]
    elif stop is not None:
        ended = "budget"
    for t in trials:
        t["wall_s"] = wall  # the process's, shared by its lengths
    return {"trials": trials, "build_s": build_s, "device_total_gb": total_gb, "ended": ended,
            "stop": stop, "wall_s": wall}  # fmt: skip


def _ladder(args) -> list[int]:
    out, length = [], args.start
    while length <= args.max_len and len(out) < args.max_trials:
        out.append(length)
        length = length + args.ladder_step if args.ladder_step else length * 2
    return out


def search(system: str, args, budget_s: float, log) -> dict:
    """The in-process ladder, then bisection in fresh processes, within ``budget_s``."""
    deadline = time.time() + budget_s
    start = time.monotonic()
    ladder = _ladder(args)
    # the child stops itself before a length it could not finish; the timeout is the backstop
    first = _process(system, ladder, args, timeout=budget_s + 15, deadline=deadline)
    trials = list(first["trials"])
    for t in trials:
        t["process"] = 0
        log(system, t)
    best = max((t for t in trials if t["ok"]), key=lambda t: t["seq_len"], default=None)
    fails = [t["seq_len"] for t in trials if not t["ok"] and t["failure"] in ("oom", "killed")]
    low_fail = min(fails) if fails else None
    if first["ended"] in ("oom", "killed"):
        bounded_by = "memory"
    elif first["ended"] in ("budget", "timeout"):
        bounded_by = "budget"
    elif first["ended"] == "error":
        bounded_by = "error"
    elif len(ladder) >= args.max_trials:
        bounded_by = "trials"
    else:
        bounded_by = "max_len"
    build_s = first["build_s"] or 0.0
    process = 1
    while bounded_by == "memory" and best is not None and low_fail is not None:
        good = best["seq_len"]
        mid = (good + low_fail) // 2 // args.granularity * args.granularity
        if mid <= good or low_fail - good <= args.granularity:
            break
        if len(trials) >= args.max_trials:
            bounded_by = "trials"
            break
        # a fresh process: its build, then the steps (quadratic in the length, to be safe)
        need = 15 + build_s + sum(best["step_times_s"]) * (mid / good) ** 2
        left = budget_s - (time.monotonic() - start)
        if need > left:
            bounded_by = "budget"
            break
        res = _process(system, [mid], args, timeout=left, deadline=None)
        for t in res["trials"]:
            t["process"] = process
            trials.append(t)
            log(system, t)
        process += 1
        last = res["trials"][-1] if res["trials"] else None
        if last is not None and last["ok"]:
            best = last
        elif last is not None and last["failure"] in ("oom", "killed"):
            low_fail = min(low_fail, last["seq_len"])
        else:
            bounded_by = "budget" if last is not None and last["failure"] == "timeout" else "error"
            break
    if first["stop"] is not None:
        print(f"[long-seq] {system}: stopped before {first['stop']['seq_len']} (predicted "
              f"{first['stop']['predicted_s']} s, past the budget)", flush=True)  # fmt: skip
    return {"system": system, "best": best, "trials": trials, "bounded_by": bounded_by,
            "low_fail": low_fail, "device_total_gb": first["device_total_gb"],
            "stopped_before": first["stop"]}  # fmt: skip


def _projection(found: dict) -> dict | None:
    """Where device and host memory would run out, extrapolating linearly from the last two
    lengths the first process trained (an estimate, never a measured length)."""
    ladder = [t for t in found["trials"] if t["ok"] and t.get("process") == 0]
    if len(ladder) < 2:
        return None
    a, b = ladder[-2], ladder[-1]
    dl = b["seq_len"] - a["seq_len"]
    out: dict = {
        "basis": [a["seq_len"], b["seq_len"]],
        "note": "linear extrapolation, not measured",
    }
    total = found.get("device_total_gb")
    if total and a.get("peak_mem_gb") is not None and b.get("peak_mem_gb") is not None:
        per_token = (b["peak_mem_gb"] - a["peak_mem_gb"]) / dl
        out["device_gb_per_1k_tokens"] = round(per_token * 1024, 4)
        if per_token > 0:
            out["device_limited_len"] = int(
                b["seq_len"] + (0.97 * total - b["peak_mem_gb"]) / per_token
            )
    if "host_available_gb" in a and "host_available_gb" in b:
        per_token = (a["host_available_gb"] - b["host_available_gb"]) / dl
        out["host_gb_per_1k_tokens"] = round(per_token * 1024, 4)
        if per_token > 0:
            # keep 4 GB of the host free
            out["host_limited_len"] = int(b["seq_len"] + (b["host_available_gb"] - 4.0) / per_token)
    limits = [out[k] for k in ("device_limited_len", "host_limited_len") if k in out]
    if limits:
        out["projected_max_seq_len"] = min(limits)
    return out


def _run_entry(found: dict) -> dict:
    best = found["best"]
    run = {"system": found["system"], "bounded_by": found["bounded_by"],
           "trials": [{k: v for k, v in t.items() if k != "tail"} | ({"tail": t["tail"][-400:]} if "tail" in t else {})
                      for t in found["trials"]]}  # fmt: skip
    if found.get("device_total_gb"):
        run["device_total_gb"] = found["device_total_gb"]
    if found.get("stopped_before"):
        run["stopped_before"] = found["stopped_before"]
    if found.get("low_fail") is not None:
        run["limit_between"] = [best["seq_len"] if best else 0, found["low_fail"]]
    projected = _projection(found)
    if projected is not None:
        low_fail = found.get("low_fail")
        if low_fail is not None and projected.get("projected_max_seq_len", 0) >= low_fail:
            # a measured failure overrules the extrapolation (e.g. host memory filling faster
            # than the last two lengths showed): keep it, marked as contradicted
            projected["contradicted_by_failure_at"] = low_fail
        run["projected"] = projected
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
        # at every length both trained: tokens/s (above 1: ours is faster) and peak device
        # memory (above 1: ours holds less)
        theirs_t = {t["seq_len"]: t for t in found["deepspeed-alst"]["trials"] if t["ok"]}
        for t in found["ours"]["trials"]:
            other = theirs_t.get(t["seq_len"]) if t["ok"] else None
            if other is None:
                continue
            key = f"ours/deepspeed-alst tokens_per_s at {t['seq_len']}"
            if other["tokens_per_s"] and key not in ratios:
                ratios[key] = round(t["tokens_per_s"] / other["tokens_per_s"], 3)
            if t.get("peak_mem_gb") and other.get("peak_mem_gb"):
                ratios[f"deepspeed-alst/ours peak_mem_gb at {t['seq_len']}"] = round(
                    other["peak_mem_gb"] / t["peak_mem_gb"], 3
                )
    return ratios


def _merged(path: str, systems: list[str]) -> dict[str, dict]:
    """The searches of the other systems in an earlier results file of this benchmark (a run
    per system in its own command, on the same machine in the same session)."""
    doc = json.loads(Path(path).read_text())
    if doc.get("scenario") != "long-seq":
        raise SystemExit(f"--merge: {path} is not a long-seq results file")
    found: dict[str, dict] = {}
    for run in doc["runs"]:
        if run["system"] in systems:
            continue  # measured again now
        ok = [t for t in run.get("trials", []) if t.get("ok")]
        found[run["system"]] = {
            "system": run["system"], "trials": run.get("trials", []), "bounded_by": run["bounded_by"],
            "best": max(ok, key=lambda t: t["seq_len"], default=None),
            "low_fail": (run.get("limit_between") or [None, None])[1],
            "device_total_gb": run.get("device_total_gb"), "stopped_before": run.get("stopped_before"),
        }  # fmt: skip
    return found


def _same_trial(a: dict, b: dict) -> bool:
    """One trial recorded in two files (``command`` numbers differ between files)."""
    keys = ("seq_len", "ok", "failure", "wall_s", "step_s", "process")
    return all(a.get(k) == b.get(k) for k in keys)


def _combined(paths: list[str]) -> dict[str, dict]:
    """Every system's trials from several results files of this benchmark (commands of one
    lease on one machine, in order), as one search: each trial keeps the file it came from
    (``command``), the longest success is the system's best, and ``bounded_by`` /
    ``stopped_before`` come from the file that measured it."""
    found: dict[str, dict] = {}
    for i, path in enumerate(paths):
        doc = json.loads(Path(path).read_text())
        if doc.get("scenario") != "long-seq":
            raise SystemExit(f"--combine: {path} is not a long-seq results file")
        for run in doc["runs"]:
            entry = found.setdefault(run["system"], {
                "system": run["system"], "trials": [], "best": None, "low_fail": None,
                "bounded_by": run["bounded_by"], "device_total_gb": run.get("device_total_gb"),
                "stopped_before": run.get("stopped_before")})  # fmt: skip
            for t in run.get("trials", []):
                trial = {**t, "command": t.get("command", i)}
                if any(_same_trial(trial, seen) for seen in entry["trials"]):
                    continue  # a file that merged an earlier one repeats its trials
                entry["trials"].append(trial)
                if t.get("ok") and (
                    entry["best"] is None or t["seq_len"] > entry["best"]["seq_len"]
                ):
                    entry["best"] = entry["trials"][-1]
                    entry["bounded_by"] = run["bounded_by"]
                    entry["stopped_before"] = run.get("stopped_before")
            fail = (run.get("limit_between") or [None, None])[1]
            if fail is not None:
                entry["low_fail"] = (
                    fail if entry["low_fail"] is None else min(entry["low_fail"], fail)
                )
    for entry in found.values():
        if (
            entry["low_fail"] is not None
            and entry["best"]
            and entry["best"]["seq_len"] >= entry["low_fail"]
        ):
            entry["low_fail"] = None  # a later command trained past an earlier failure
    return found


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--systems", nargs="+", default=["deepspeed-alst", "ours", "hf-plain"], choices=SYSTEMS
    )
    ap.add_argument("--start", type=int, default=16384, help="first length tried (tokens)")
    ap.add_argument("--granularity", type=int, default=4096, help="bisection step (tokens)")
    ap.add_argument("--ladder-step", type=int, default=0,
                    help="tokens added per ladder length (0: double). Near a known bound, one "
                         "process stepping through start, start+N, ... pays one model build "
                         "where bisecting pays one per length")  # fmt: skip
    ap.add_argument("--max-len", type=int, default=4 * 1024 * 1024)
    ap.add_argument("--max-trials", type=int, default=10, help="lengths tried per system")
    ap.add_argument("--budget-s", type=float, default=170.0,
                    help="seconds per system's search, model builds included")  # fmt: skip
    ap.add_argument("--total-s", type=float, default=540.0,
                    help="seconds for the whole run: each system gets at most its share of what is left")  # fmt: skip
    ap.add_argument("--trial-timeout", type=float, default=170.0,
                    help="seconds for the tokens/s trial of ours at DeepSpeed's longest length")  # fmt: skip
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--ours-keep-gb", type=float, default=0.0,
                    help="ours: GB of checkpointed layer inputs kept on the device per step "
                         "(ds_seq.HiddenStatesOffload keep_on_device_bytes; 0: all to the host)")  # fmt: skip
    ap.add_argument("--nproc", type=int, default=1, help="GPUs: sp = N for ours and deepspeed-alst")
    ap.add_argument("--device-name", default=None)
    ap.add_argument("--out", default=None, help="results path (default benchmarks/results/...)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other systems' runs of the --out file (a search per command)")  # fmt: skip
    ap.add_argument("--tiny", action="store_true", help="a small model on the CPU (smoke test)")
    ap.add_argument("--trial", choices=SYSTEMS, help=argparse.SUPPRESS)
    ap.add_argument("--lengths", type=int, nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    # --tiny only: lengths from this one fail as out of memory (exercises the bisection)
    ap.add_argument("--simulate-oom-at", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--chart", metavar="FILE", help="only draw the PNG of an existing results file")
    ap.add_argument("--combine", nargs="+", metavar="FILE",
                    help="only write --out from these results files (commands of one lease, in "
                         "order): each system's trials joined into one search")  # fmt: skip
    args = ap.parse_args()
    if args.chart:
        chart(Path(args.chart))
        return
    if args.trial:
        run_trial(args)
        return
    if args.combine:
        if not args.out:
            ap.error("--combine needs --out")
        first = json.loads(Path(args.combine[0]).read_text())
        last = json.loads(Path(args.combine[-1]).read_text())
        found = _combined(args.combine)
        path = write_results(
            scenario="long-seq",
            device=args.device_name or first["device"],
            metric="max_seq_len",
            date=last.get("date"),
            runs=[_run_entry(f) for f in found.values()],
            ratios=_ratios(found),
            path=args.out,
            config={
                **first.get("config", {}),
                "combined_from": [Path(p).name for p in args.combine],
            },
        )
        chart(Path(path))
        return
    # a SIGTERM (a time limit) unwinds like Ctrl-C, so the running trial is killed too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.start % args.nproc or args.granularity % args.nproc or args.ladder_step % args.nproc:
        ap.error(
            f"--start, --granularity and --ladder-step must be multiples of --nproc ({args.nproc})"
        )
    if args.ladder_step < 0:
        ap.error(f"--ladder-step {args.ladder_step} must be >= 0 (0 doubles the length)")
    t_end = time.monotonic() + args.total_s
    device = args.device_name or (
        f"{os.cpu_count()}-core CPU (tiny model)" if args.tiny else f"{args.nproc} x GPU"
    )
    found: dict[str, dict] = {}
    if args.merge:
        if not args.out or not Path(args.out).exists():
            ap.error("--merge needs --out naming an existing results file of this benchmark")
        found = _merged(args.out, args.systems)

    def log(system: str, res: dict) -> None:
        status = "ok" if res["ok"] else res["failure"]
        extra = f"{res['tokens_per_s']} tok/s, {res['peak_mem_gb']} GB" if res["ok"] else ""
        print(
            f"[long-seq] {system} {res['seq_len']}: {status} (process {res.get('process', 0)}, "
            f"{res['wall_s']} s) {extra}",
            flush=True,
        )
        # the JSON shows a search in progress too
        entry = found.setdefault(
            system, {"system": system, "best": None, "trials": [], "bounded_by": "budget"}
        )
        if not any(t is res for t in entry["trials"]):
            entry["trials"].append(res)
        if res["ok"] and (entry["best"] is None or res["seq_len"] > entry["best"]["seq_len"]):
            entry["best"] = res
        write()

    written: list[Path] = []

    def write() -> None:
        runs = [_run_entry(f) for f in found.values()]
        if not runs:
            return
        written[:] = [write_results(
            scenario="long-seq", device=device, runs=runs, ratios=_ratios(found), path=args.out, metric="max_seq_len",
            config={"model": "Llama-3.2-3B shape" if not args.tiny else "tiny Llama", "nproc": args.nproc,
                    "sp": args.nproc, "steps": args.steps, "start": args.start, "granularity": args.granularity,
                    "max_trials": args.max_trials, "budget_s": args.budget_s, "total_s": args.total_s,
                    "ours_keep_on_device_gb": args.ours_keep_gb,
                    "ladder_step": args.ladder_step,
                    "search": ("one process per system over the ladder start, " + (f"+{args.ladder_step}, ..." if args.ladder_step else "2x, ...")
                               + "; fresh processes bisect after an OOM"),
                    "zero": "stage 3, offload_optimizer + offload_param cpu, bf16, AdamW"},
        )]  # fmt: skip

    for i, system in enumerate(args.systems):
        share = (t_end - time.monotonic()) / (len(args.systems) - i)
        budget = min(args.budget_s, share)
        found[system] = {"system": system, "best": None, "trials": [], "bounded_by": "budget"}
        found[system] = search(system, args, budget, log)
        write()
    ds, ours = found.get("deepspeed-alst", {}).get("best"), found.get("ours")
    left = t_end - time.monotonic()
    if ds and ours and not any(t["ok"] and t["seq_len"] == ds["seq_len"] for t in ours["trials"]):
        if left > 60:
            res = _process("ours", [ds["seq_len"]], args, timeout=min(args.trial_timeout, left),
                           deadline=None)  # fmt: skip
            for t in res["trials"]:
                t["process"] = "tokens/s at DeepSpeed's longest"
                ours["trials"].append(t)
                log("ours", t)
        else:
            print(f"[long-seq] no time left ({left:.0f} s) for ours at {ds['seq_len']}", flush=True)
    write()
    if written:
        chart(written[0])


def chart(path: Path) -> Path | None:
    """A PNG beside the results file (and in $OUT): each system's device peak memory and tokens/s
    against the sequence length, every trial drawn (a cross where a length failed), and the
    longest length each system trained in the legend."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[long-seq] matplotlib is not installed: no chart", flush=True)
        return None
    doc = json.loads(Path(path).read_text())
    fig, (mem_ax, tps_ax) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = {"ours": "tab:blue", "deepspeed-alst": "tab:orange", "hf-plain": "tab:gray"}
    for run in doc["runs"]:
        name, color = run["system"], colors.get(run["system"], "tab:green")
        ok = sorted((t for t in run["trials"] if t.get("ok")), key=lambda t: t["seq_len"])
        failed = [t["seq_len"] for t in run["trials"] if not t.get("ok")]
        label = f"{name}: longest {run.get('max_seq_len') or 'none'} ({run['bounded_by']})"
        # a CPU run (--tiny) has no device memory to draw: its lengths sit at 0
        mem = [t.get("peak_mem_gb") or 0.0 for t in ok]
        mem_ax.plot([t["seq_len"] for t in ok], mem, "o-", color=color, label=label)
        tps_ax.plot([t["seq_len"] for t in ok], [t["tokens_per_s"] for t in ok], "o-",
                    color=color, label=name)  # fmt: skip
        if failed:
            top = max(mem or [1.0])
            mem_ax.plot(failed, [top] * len(failed), "x", color=color, markersize=9)
    for ax, ylabel in ((mem_ax, "device peak memory (GB)"), (tps_ax, "tokens/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    mem_ax.set_title("peak memory per trained length (x: failed)")
    tps_ax.set_title("training throughput")
    fig.suptitle(f"long-seq, {doc['config']['model']}, {doc['device']}")
    fig.tight_layout()
    png = Path(path).with_suffix(".png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / png.name
        if out.resolve() != png.resolve():
            out.write_bytes(png.read_bytes())
    print(f"[long-seq] chart {png}", flush=True)
    return png


if __name__ == "__main__":
    main()
