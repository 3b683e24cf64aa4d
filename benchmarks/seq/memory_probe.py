"""Where the long-seq benchmark's device memory goes, measured on the CPU with a shrunk model.

    python benchmarks/seq/memory_probe.py [--lengths 1024 2048] [--deepspeed]

No GPU is needed: "device" bytes are those of the tensors that torch ops create while one
training step runs (a ``TorchDispatchMode`` follows every op's outputs until they are freed),
plus the stage-3 parameters gathered at that moment (ds-zero resizes their storage, which no op
reports), minus the checkpointed hidden states that ds-seq copies to host memory (on a GPU they
leave the device; here their copies are marked as host). The copy back for a layer's backward
is counted (it is device memory on a GPU).

Parts:

* ``engine``: ours as ``long_seq.py`` runs it (ds_all's engine, ZeRO-3 with offload_optimizer
  and offload_param to the CPU, bf16, AdamW, clipping 1.0, TiledMLP, the tiled loss and the
  offloaded checkpoints) on a Llama of the 3B model's proportions (head_dim 128, 3 query heads
  per KV head, intermediate / hidden and vocab / hidden as the 3B's), second step of each length:
  its peak device bytes, what ZeRO still holds of reduced gradients when backward ends, and
  how many layer inputs went to the host. From two lengths: bytes per token and the fixed part.
* ``pieces`` (with ``--deepspeed``, run under DeepSpeed's environment): TiledFusedLogitsLoss and
  TiledMLP of ds_seq and of DeepSpeed 0.19.8, same inputs, peak device bytes of forward +
  backward.

The report ends with the 3B model's expected peak at 16K tokens, from first principles.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# the 3B model's proportions at hidden 384: head_dim 128, GQA 3:1, intermediate 8192/3072,
# vocab 128256/3072
SHRUNK = dict(hidden_size=384, num_hidden_layers=4, num_attention_heads=3, num_key_value_heads=1,
              intermediate_size=1024, vocab_size=16032)  # fmt: skip
FULL = dict(hidden=3072, layers=28, heads=24, kv_heads=8, intermediate=8192, vocab=128256)


class DeviceBytes(TorchDispatchMode):
    """Live bytes of the storages that ops create under this mode (and of their views), the
    largest total seen, and the size of the outputs at that moment's op."""

    def __init__(self, extra=lambda: 0) -> None:
        super().__init__()
        self.extra = extra
        self.live: dict[int, list[int]] = {}  # storage pointer -> [bytes, tracked tensors]
        self.host: set[int] = set()
        self.now = 0
        self.peak = 0
        self.peak_op = ""
        self.phase = "forward"
        self.phase_peaks: dict[str, int] = {}

    def _drop(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self.live[ptr]
            self.now -= entry[0]

    def mark_host(self, t: torch.Tensor) -> None:
        ptr = t.untyped_storage().data_ptr()
        self.host.add(ptr)
        entry = self.live.pop(ptr, None)
        if entry is not None:
            self.now -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs or {}))
            if isinstance(t, torch.Tensor)
        }
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr, size = storage.data_ptr(), storage.nbytes()
            if ptr == 0 or size == 0 or ptr in self.host:
                continue
            if ptr in self.live:
                self.live[ptr][1] += 1
            elif ptr in inputs:
                continue  # a view or in-place result of memory that existed before the mode
            else:
                self.live[ptr] = [size, 1]
                self.now += size
            weakref.finalize(t, self._drop, ptr)
        total = self.now + self.extra()
        if total > self.peak:
            self.peak, self.peak_op = total, f"{func} ({self.phase})"
        if total > self.phase_peaks.get(self.phase, 0):
            self.phase_peaks[self.phase] = total
        return out


def _gathered_bytes(engine) -> int:
    from ds_zero._bucket import ParamsState

    return sum(
        b.layout.padded_numel * b.flat.element_size()
        for b in engine.zero.buckets
        if b.shard_params and b.state is not ParamsState.SHARDED
    )


def probe_engine(seq_len: int, before: bool) -> dict:
    """Ours, as long_seq.py trains it, on the shrunk model: the second step's device bytes.
    ``before``: as before ds-zero 0.1.5 / ds-offload 0.1.6 (every reduced gradient kept on the
    device until the step, a pool of 4 host gradient buffers)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import long_seq
    from transformers import LlamaConfig

    import ds_offload._stepper as stepper_mod
    import ds_seq
    import ds_seq._tiled as tiled

    saved = (stepper_mod.OffloadStepper.holds_grad, stepper_mod.host_available_bytes)
    if before:
        stepper_mod.OffloadStepper.holds_grad = lambda self, index: False
        stepper_mod.host_available_bytes = lambda: 0

    cfg = LlamaConfig(**SHRUNK, max_position_embeddings=max(seq_len, 4096), rope_theta=500000.0,
                      tie_word_embeddings=False, attn_implementation="sdpa", use_cache=False)  # fmt: skip
    mode_box: list[DeviceBytes] = []
    counted = {"offloads": 0, "offload_bytes": 0}
    offload, restore = ds_seq.HiddenStatesOffload.offload, ds_seq.HiddenStatesOffload.restore

    def host_offload(self, t):
        # a CPU run keeps CPU tensors where they are; copy them as a GPU run would and mark the
        # copy as host memory
        self.offload_cpu_inputs = True
        host, device = offload(self, t)
        if device is not None:
            counted["offloads"] += 1
            counted["offload_bytes"] += t.numel() * t.element_size()
            if mode_box:
                mode_box[0].mark_host(host)
        return host, device

    def device_restore(self, host, device):
        return restore(self, host, device).clone()  # on a GPU the copy back is device memory

    loss_forward = tiled._TiledLossFunction.forward

    def phased_loss_forward(*a, **k):
        if mode_box:
            mode_box[0].phase = "loss"
        try:
            return loss_forward(*a, **k)
        finally:
            if mode_box:
                mode_box[0].phase = "forward"

    ds_seq.HiddenStatesOffload.offload = host_offload
    ds_seq.HiddenStatesOffload.restore = device_restore
    tiled._TiledLossFunction.forward = staticmethod(phased_loss_forward)
    try:
        args = SimpleNamespace(seq_len=seq_len, tiny=True)
        step, _ = long_seq._train_ours(args, cfg, torch.device("cpu"), 0, 1)
        engine = _find_engine(step)
        step(0)  # warm-up: pools, buffers, the recorded forward order
        held: dict[str, int] = {}
        zero = engine.zero
        finish, backward, opt_step = zero._finish_backward, engine.backward, engine.step

        def finish_and_count():
            held["gathered_at_backward_end"] = _gathered_bytes(engine)
            finish()
            held["reduced_grads"] = sum(
                b.grad_shard.numel() * b.grad_shard.element_size()
                for b in zero.trainable
                if b.grad_shard is not None
            )

        def phased(name, fn):
            def run(*a, **k):
                mode_box[0].phase = name
                return fn(*a, **k)

            return run

        zero._finish_backward = finish_and_count
        engine.backward, engine.step = phased("backward", backward), phased("step", opt_step)
        counted.update(offloads=0, offload_bytes=0)
        gc.collect()
        mode = DeviceBytes(extra=lambda: _gathered_bytes(engine))
        mode_box.append(mode)
        with mode:
            step(1)
        mode_box.clear()
    finally:
        ds_seq.HiddenStatesOffload.offload, ds_seq.HiddenStatesOffload.restore = offload, restore
        tiled._TiledLossFunction.forward = staticmethod(loss_forward)
        stepper_mod.OffloadStepper.holds_grad, stepper_mod.host_available_bytes = saved
    params = sum(b.layout.padded_numel for b in zero.trainable)
    return {"seq_len": seq_len, "peak": mode.peak, "peak_op": mode.peak_op, "params": params,
            "phases": dict(mode.phase_peaks), "layers": cfg.num_hidden_layers, **held, **counted}  # fmt: skip


def _find_engine(step):
    for cell in step.__closure__ or ():
        value = cell.cell_contents
        if hasattr(value, "zero"):
            return value
    raise RuntimeError("the benchmark's step function holds no engine")


def probe_pieces(seq_len: int, hidden: int, vocab: int, inter: int) -> list[tuple[str, int]]:
    """TiledFusedLogitsLoss and TiledMLP forward + backward, ds_seq's and DeepSpeed's."""
    from deepspeed.runtime.sequence_parallel import ulysses_sp as ds_ulysses

    import ds_seq

    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False).to(torch.bfloat16)
    mlp = torch.nn.ModuleDict(dict(gate_proj=torch.nn.Linear(hidden, inter, bias=False),
                                   up_proj=torch.nn.Linear(hidden, inter, bias=False),
                                   down_proj=torch.nn.Linear(inter, hidden, bias=False))).to(torch.bfloat16)  # fmt: skip
    y = torch.randint(0, vocab, (1, seq_len))
    shards = max(1, math.ceil(seq_len * vocab * 4 / 2**30))
    mlp_shards = max(1, math.ceil(seq_len / hidden))

    def loss_fn(self, x, t):
        return torch.nn.functional.cross_entropy(self(x).float(), t, reduction="sum")

    def mlp_fn(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

    out = []
    for name, lib in (("ds_seq", ds_seq), ("deepspeed", ds_ulysses)):
        for piece in ("TiledFusedLogitsLoss", "TiledMLP"):
            x = torch.randn(1, seq_len, hidden, dtype=torch.bfloat16, requires_grad=True)
            module = head if piece == "TiledFusedLogitsLoss" else mlp
            module.zero_grad(set_to_none=True)
            gc.collect()
            with DeviceBytes() as mode:
                if piece == "TiledFusedLogitsLoss":
                    r = lib.TiledFusedLogitsLoss.apply(loss_fn, head, x, y, None, shards, [head.weight], "sum")  # fmt: skip
                else:
                    params = [mlp.down_proj.weight, mlp.gate_proj.weight, mlp.up_proj.weight]
                    r = lib.TiledMLP.apply(mlp_fn, mlp, x, mlp_shards, params).float().sum()
                r.backward()
                del r
            out.append((f"{name} {piece}", mode.peak))
    return out


def first_principles(seq_len: int) -> list[tuple[str, float, float]]:
    """(item, ours before this change GiB, ours after GiB) for the 3B model at ``seq_len``."""
    f = FULL
    per_layer = (f["hidden"] * (f["hidden"] + 2 * f["hidden"] // f["heads"] * f["kv_heads"] + f["hidden"])
                 + 3 * f["hidden"] * f["intermediate"] + 2 * f["hidden"])  # fmt: skip
    root = 2 * f["vocab"] * f["hidden"] + f["hidden"]
    n = f["layers"] * per_layer + root
    gib = 2**30
    s = seq_len
    tile = math.ceil(s / max(1, math.ceil(s * f["vocab"] * 4 / gib)))
    rows = [
        ("fp32 reduced gradients kept until step (4 B/param)", 4 * n / gib, 0.0),
        ("root unit gathered through fwd+bwd (embed + lm_head, bf16)", 2 * root / gib, 2 * root / gib),
        ("embed + lm_head bf16 grads at the root's reduction", 2 * 2 * f["vocab"] * f["hidden"] / gib,
         2 * 2 * f["vocab"] * f["hidden"] / gib),
        ("root's fp32 flat gradient (take_grads) at its reduction", 4 * root / gib, 4 * root / gib),
        ("one loss tile: bf16 + fp32 logits, fp32 grad (peak of a tile)",
         tile * f["vocab"] * (2 + 4 + 4 + 2) / gib, tile * f["vocab"] * (2 + 4 + 4 + 2) / gib),
        ("one layer's recompute + backward (~18.5 x [S, hidden] bf16, the probe's slope)",
         18.5 * s * f["hidden"] * 2 / gib, 18.5 * s * f["hidden"] * 2 / gib),
    ]  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--lengths", type=int, nargs=2, default=[1024, 2048])
    ap.add_argument(
        "--deepspeed", action="store_true", help="also measure DeepSpeed's tiled pieces"
    )
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument(
        "--after-only", action="store_true", help="only the current code (no 'before' run)"
    )
    ap.add_argument("--vocab", type=int, default=SHRUNK["vocab_size"],
                    help="a smaller vocabulary shrinks the root unit, so that the layers' "
                         "per-token memory decides the backward peak at CPU-sized lengths")  # fmt: skip
    args = ap.parse_args()
    SHRUNK["vocab_size"] = args.vocab
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    mib = 2**20
    modes = [] if args.skip_engine else [False] if args.after_only else [True, False]
    for before in modes:
        label = "before" if before else "after"
        runs = [probe_engine(s, before) for s in args.lengths]
        for r in runs:
            phases = ", ".join(f"{k} {v / mib:.1f}" for k, v in r["phases"].items())
            print(f"[engine {label}] {r['seq_len']} tokens: peak {r['peak'] / mib:.1f} MiB at {r['peak_op']} "
                  f"(per phase, MiB: {phases}); reduced grads held when backward ends "
                  f"{r['reduced_grads'] / mib:.1f} MiB ({r['reduced_grads'] / max(1, r['params']):.2f} B/param "
                  f"of {r['params']:,}); gathered then {r['gathered_at_backward_end'] / mib:.1f} MiB; "
                  f"{r['offloads']} checkpoint inputs to host ({r['layers']} layers), "
                  f"{r['offload_bytes'] / mib:.1f} MiB")  # fmt: skip
        a, b = runs
        for phase in ("forward", "backward"):
            pa, pb = a["phases"].get(phase, 0), b["phases"].get(phase, 0)
            slope = (pb - pa) / (b["seq_len"] - a["seq_len"])
            print(f"[engine {label}] {phase} peak: {slope / 1024:.2f} KiB per token "
                  f"({slope / SHRUNK['hidden_size'] / 2:.1f} x [tokens, hidden] bf16), fixed part "
                  f"{(pa - slope * a['seq_len']) / mib:.1f} MiB")  # fmt: skip
    if args.deepspeed:
        for name, peak in probe_pieces(args.lengths[-1], SHRUNK["hidden_size"], SHRUNK["vocab_size"],
                                       SHRUNK["intermediate_size"]):  # fmt: skip
            print(f"[pieces] {name}: peak {peak / mib:.1f} MiB at {args.lengths[-1]} tokens")
    print("[3B at 16K, first principles, GiB]  item: before / after")
    before = after = 0.0
    for item, x, y in first_principles(16384):
        before, after = before + x, after + y
        print(f"  {item}: {x:.2f} / {y:.2f}")
    print(f"  sum (an upper bound: not all at once): {before:.2f} / {after:.2f}")


if __name__ == "__main__":
    main()
