"""Tier 2: crash consistency. 50 saves by 2 gloo ranks, each SIGKILLed at a random moment (a
random rank first, then the other, as a fail-fast launcher would); after each, loading gets a
complete checkpoint: the previous one, or the new one only if its commit had finished."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import random
import signal
import time

import torch
import torch.distributed as dist

import ds_ckpt
from ds_ckpt import Fragment

TRIALS = 50
NUMEL = 1 << 18  # 1 MB per tensor: a save takes long enough to be killed inside it


def _state(value: int) -> dict[str, torch.Tensor]:
    return {f"w{i}": torch.full((NUMEL,), float(value) + i) for i in range(4)}


def _writer(root: str, tag: str, value: int, rank: int, store_path: str, ready) -> None:
    store = dist.FileStore(store_path, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    state = _state(value)
    # w0, w1 replicated (deduped); w2, w3 split between the ranks
    frs = [Fragment.whole("w0", state["w0"]), Fragment.whole("w1", state["w1"])]
    half = NUMEL // 2
    frs += [Fragment.slice_of(n, state[n], rank * half, half) for n in ("w2", "w3")]
    dist.barrier()
    ready.set()
    ds_ckpt.save(root, tag, frs, {"v": value})
    dist.destroy_process_group()


def _start(ctx, root, tag, value, tmp, trial):
    store = os.path.join(tmp, f"store{trial}")
    ready = [ctx.Event() for _ in range(2)]
    procs = [
        ctx.Process(target=_writer, args=(root, tag, value, r, store, ready[r])) for r in range(2)
    ]
    for p in procs:
        p.start()
    for e in ready:
        assert e.wait(60), "writer did not start"
    return procs


def _kill(p) -> None:
    # a forkserver child that already exited has been reaped by the forkserver
    with contextlib.suppress(ProcessLookupError):
        os.kill(p.pid, signal.SIGKILL)


def _load(root) -> tuple[int, str]:
    want = {n: torch.zeros(NUMEL) for n in ("w0", "w1", "w2", "w3")}
    cs = ds_ckpt.load(root, None, [Fragment.whole(n, t) for n, t in want.items()])
    v = cs["v"]
    for i, (n, t) in enumerate(want.items()):
        assert bool((t == v + i).all()), f"tensor {n} of checkpoint v={v} is mixed"
    return v, ds_ckpt.resolve_tag(root, None)


def test_sigkill_during_save_leaves_previous_checkpoint(tmp_path):
    ctx = mp.get_context("forkserver")
    # Writers fork from a server that already imported everything: a trial costs ~0.5 s.
    ctx.set_forkserver_preload(["torch", "torch.distributed", "ds_ckpt", __name__])
    root = str(tmp_path / "ckpt")
    rng = random.Random(0)
    # Calibration: an uninterrupted save gives the first complete checkpoint and its duration.
    procs = _start(ctx, root, "t0", 0, str(tmp_path), 0)
    t0 = time.perf_counter()  # from the moment both ranks enter save()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    duration = time.perf_counter() - t0
    assert _load(root) == (0, "t0")
    prev, outcomes = 0, {"old": 0, "new": 0}
    for trial in range(1, TRIALS + 1):
        procs = _start(ctx, root, f"t{trial}", trial, str(tmp_path), trial)
        time.sleep(rng.uniform(0, duration * 1.2))
        victim = rng.randrange(2)
        _kill(procs[victim])
        time.sleep(rng.uniform(0, duration * 0.3))
        for p in procs:
            _kill(p)
            p.join(30)
        v, tag = _load(root)
        assert v in (prev, trial), f"trial {trial}: loaded v={v}, expected {prev} or {trial}"
        assert tag == f"t{v}"  # what `latest` names is what was loaded
        outcomes["new" if v == trial else "old"] += 1
        prev = v
    # Both sides of the commit point were hit, so the test exercised interrupted saves.
    print(f"crash trials: {outcomes}")
    assert outcomes["old"] >= 5 and outcomes["new"] >= 1, outcomes
    ds_ckpt.save(
        root, "after", [Fragment.whole(n, t) for n, t in _state(99).items()], {"v": 99}
    )  # a later save cleans the crashed saves' temp dirs
    assert not [d for d in os.listdir(root) if d.startswith(".")]
