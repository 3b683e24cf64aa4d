"""Checkpoint save/load bandwidth: ds_ckpt against the raw disk (dd, O_DIRECT) and the peers.

cpu (one process, run on the development machine):
    python benchmarks/ckpt/ckpt_bench.py cpu --gb 1.5 --dir /tmp/ckpt_bench
  ds_ckpt save (sync and async) and load of a ~GB fp32 state, against dd O_DIRECT write/read
  of the same size on the same disk, and against torch.save/torch.load (the writer DeepSpeed
  uses) of the same state.

cpu-load (the cost of the checksums every load verifies):
    python benchmarks/ckpt/ckpt_bench.py cpu-load --gb 1.5 --reps 5 --dir /tmp/ckpt_bench
  cold and warm loads of the same ~GB fp32 state by three systems, each load in a fresh
  process, the order rotated every rep: the previous release's code (git --baseline-rev,
  default 42c427d: ds-ckpt 0.1.2, no checksums) loading its own checkpoint, this code with
  the checksum verification switched off (the benchmark-only switch
  `_load._VERIFY_CHECKSUMS`), and this code as users run it (every chunk checksum verified).
  Wall and CPU seconds (all threads; user and system apart) and context switches of each load.
  --also-rev REV (or --also-src, an extracted copy) adds that revision's default load, e.g.
  this code before a change; --verify-reads 16 adds this code's verified load with page-cached
  bytes read in 16 MiB preads (`_load._VERIFY_READ`) instead of 1 MiB; --cache-probe-flip adds
  it with the one-byte page-cache probe before each span (`_load._PROBE_CACHE`) switched the
  other way from this host's default;
  --threads-variants 8 adds it with 8 read threads (`_load._READ_THREADS`); --suffix
  keeps an earlier results file of the same day. The file records the xxhash version and the C entry
  point hashed outside the GIL (xxh3_binding; null: xxhash's Python functions).

gpu (2 ranks, the 1.34B GPT: d=2048, 24 layers, bf16, AdamW, ZeRO stage 1 or 2):
    torchrun --nproc_per_node 2 benchmarks/ckpt/ckpt_bench.py gpu --stage 1 --dir $OUT/ckpt
  DeepSpeed 0.19.8 engine.save_checkpoint/load_checkpoint against ds_ckpt save/load of the same
  state (bf16 weights replicated, fp32 master + exp_avg + exp_avg_sq partitioned over ranks),
  plus dd O_DIRECT on the same disk, all in one session.

Load timings are cold: the page cache of the checkpoint files is dropped first
(posix_fadvise DONTNEED after fsync). Results: JSON to benchmarks/results/ (and --out-dir), in
the shared results schema (benchmarks/_results.py).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# CKPT_BENCH_SRC: the cpu-load workers import another revision's ds_ckpt from there
sys.path.insert(
    0,
    os.environ.get("CKPT_BENCH_SRC")
    or os.path.join(HERE, "..", "..", "packages", "ds-ckpt", "src"),
)
import ds_ckpt  # noqa: E402
import ds_ckpt._load as ds_ckpt_load  # noqa: E402  (private knob, toggled to compare read paths)
from ds_ckpt import Fragment  # noqa: E402

sys.path.insert(0, os.path.join(HERE, ".."))  # the shared results writer
from _results import default_path, runs_from_columns, write_results  # noqa: E402


# ---- helpers ------------------------------------------------------------------------------
def evict(paths: list[str]) -> None:
    """Drop the page cache of these files, so the next read comes from the disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def files_under(d: str) -> list[str]:
    return [p for p in glob.glob(os.path.join(d, "**", "*"), recursive=True) if os.path.isfile(p)]


def du(d: str) -> int:
    return sum(os.path.getsize(p) for p in files_under(d))


def dd(path: str, nbytes: int) -> dict[str, float]:
    """dd with O_DIRECT: write (with a final fsync) then read nbytes in 64 MiB blocks."""
    count = max(1, nbytes // (64 << 20))
    size = count * (64 << 20)
    out = {}
    for what, args in (
        ("write", ["if=/dev/zero", f"of={path}", "oflag=direct", "conv=fsync"]),
        ("read", [f"if={path}", "of=/dev/null", "iflag=direct"]),
    ):
        t0 = time.perf_counter()
        subprocess.run(["dd", *args, "bs=64M", f"count={count}"], check=True, capture_output=True)
        out[f"dd_{what}_GBps"] = size / (time.perf_counter() - t0) / 1e9
    os.remove(path)
    return out


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace(" ", "-")
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.+)", f.read())
        return f"cpu-{os.cpu_count()}c-" + (
            m.group(1).split("@")[0].strip().replace(" ", "-") if m else platform.machine()
        )
    except OSError:
        return "cpu"


SYSTEMS = {"ours": "ds-ckpt", "torch": "torch.save/torch.load", "ds": "deepspeed"}


def write_result(res: dict, scenario: str, out_dir: str | None) -> None:
    """The shared results schema (benchmarks/_results.py): each system's medians (``ours_save_s``
    -> the ds-ckpt run's ``save_s``) and GB/s become its run; dd stays a disk reference."""
    columns: dict[str, dict[str, float]] = {}
    extra = {}
    for key, value in res.items():
        if key == "median_s":
            for k, v in value.items():
                who, what = k.split("_", 1)
                columns.setdefault(what, {})[SYSTEMS[who]] = v
        elif key.endswith("_GBps") and key.split("_", 1)[0] in SYSTEMS:
            who, what = key.split("_", 1)
            columns.setdefault(what, {})[SYSTEMS[who]] = value
        elif key not in ("scenario", "device", "ratios"):
            extra[key] = value
    dev = re.sub(r"[^A-Za-z0-9_.-]", "", res["device"]).lower()
    name = f"{scenario}-{dev}-{datetime.date.today():%Y%m%d}.json"
    path = write_results(
        scenario=scenario,
        device=res["device"],
        date=datetime.date.today().isoformat(),
        path=os.path.join(HERE, "..", "results", name),
        metric=[m for m in ("save_s", "load_s", "load_cold_s") if m in columns],
        runs=runs_from_columns(columns),
        ratios=res["ratios"],
        copy_to_out=False,
        **extra,
    )
    print("wrote", path)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        shutil.copy(path, os.path.join(out_dir, name))
        print("wrote", os.path.join(out_dir, name))


# ---- cpu -------------------------------------------------------------------------------------
def bench_cpu(args: argparse.Namespace) -> None:
    root = args.dir
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    n_tensors = 24
    numel = int(args.gb * 1e9 / 4 / n_tensors)
    g = torch.Generator().manual_seed(0)
    state = {f"layers.{i}.weight": torch.randn(numel, generator=g) for i in range(n_tensors)}
    nbytes = sum(t.numel() * 4 for t in state.values())
    frs = [Fragment.whole(n, t) for n, t in state.items()]
    dst = {n: torch.empty_like(t) for n, t in state.items()}
    runs: dict[str, list[float]] = {
        k: []
        for k in (
            "ours_save_s",
            "ours_save_nohash_s",
            "ours_load_cold_s",
            "ours_async_block_s",
            "ours_async_total_s",
            "torch_save_s",
            "torch_load_cold_s",
        )
    }
    disk = []
    for rep in range(args.reps):
        disk.append(dd(os.path.join(root, "dd.bin"), nbytes))
        t0 = time.perf_counter()
        ds_ckpt.save(root, f"s{rep}", frs)
        runs["ours_save_s"].append(time.perf_counter() - t0)
        # save -> drop cache -> load, the same order as the torch.save/torch.load pair below
        # (the virtual disk of a VM may cache on the host: order changes "cold" reads)
        evict(files_under(os.path.join(root, f"s{rep}")))
        t0 = time.perf_counter()
        ds_ckpt.load(root, f"s{rep}", [Fragment.whole(n, t) for n, t in dst.items()])
        runs["ours_load_cold_s"].append(time.perf_counter() - t0)
        assert all(torch.equal(dst[n], state[n]) for n in state)
        t0 = time.perf_counter()
        ds_ckpt.save(root, f"n{rep}", frs, hashes=False)
        runs["ours_save_nohash_s"].append(time.perf_counter() - t0)
        shutil.rmtree(os.path.join(root, f"n{rep}"))
        t0 = time.perf_counter()
        ds_ckpt.save(root, f"a{rep}", frs, async_=True)
        runs["ours_async_block_s"].append(time.perf_counter() - t0)
        ds_ckpt.finalize()
        runs["ours_async_total_s"].append(time.perf_counter() - t0)
        path = os.path.join(root, f"torch{rep}.pt")
        t0 = time.perf_counter()
        torch.save(state, path)
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)  # ds_ckpt's save includes fsync; be equally durable
        os.close(fd)
        runs["torch_save_s"].append(time.perf_counter() - t0)
        evict([path])
        t0 = time.perf_counter()
        loaded = torch.load(path, weights_only=True)
        runs["torch_load_cold_s"].append(time.perf_counter() - t0)
        del loaded
        for d in (f"s{rep}", f"a{rep}"):
            shutil.rmtree(os.path.join(root, d))
        os.remove(path)
    med = {k: statistics.median(v) for k, v in runs.items()}
    dmed = {k: statistics.median(d[k] for d in disk) for k in disk[0]}
    gbps = {k[:-2] + "_GBps": nbytes / v / 1e9 for k, v in med.items()}
    res = {
        "scenario": "ckpt-cpu",
        "device": device_name(),
        "bytes": nbytes,
        "reps": args.reps,
        "median_s": med,
        "all_s": runs,
        **{k: round(v, 3) for k, v in gbps.items()},
        **{k: round(v, 3) for k, v in dmed.items()},
        "ratios": {
            "ours_save_vs_dd_write": round(gbps["ours_save_GBps"] / dmed["dd_write_GBps"], 3),
            "ours_save_nohash_vs_dd_write": round(
                gbps["ours_save_nohash_GBps"] / dmed["dd_write_GBps"], 3
            ),
            "ours_load_vs_dd_read": round(gbps["ours_load_cold_GBps"] / dmed["dd_read_GBps"], 3),
            "ours_save_vs_torch_save": round(med["torch_save_s"] / med["ours_save_s"], 3),
            "ours_load_vs_torch_load": round(med["torch_load_cold_s"] / med["ours_load_cold_s"], 3),
        },
        "note": "cold loads (page cache dropped with posix_fadvise); medians of reps; the "
        "machine is shared, so compare ratios measured in this one run",
        "torch": torch.__version__,
        "ds_ckpt": ds_ckpt.__version__,
        "load_avg": os.getloadavg(),
    }
    print(json.dumps(res, indent=1))
    write_result(res, "ckpt-cpu", args.out_dir)
    shutil.rmtree(root, ignore_errors=True)


# ---- gpu -------------------------------------------------------------------------------------
class _Block(torch.nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.qkv, self.proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.fc1, self.fc2 = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)
        self.h = h

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.h, c // self.h).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, c))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))


class _GPT(torch.nn.Module):
    """The 1.34B GPT (d=2048, 24 layers, vocab 32768, seq 1024)."""

    def __init__(self, vocab=32768, d=2048, layers=24, seq=1024) -> None:
        super().__init__()
        self.tok, self.pos = torch.nn.Embedding(vocab, d), torch.nn.Embedding(seq, d)
        self.blocks = torch.nn.ModuleList(_Block(d, d // 128) for _ in range(layers))
        self.ln, self.head = torch.nn.LayerNorm(d), torch.nn.Linear(d, vocab, bias=False)

    def forward(self, idx, targets):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.ln(x))
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)
        )


def _our_fragments(model: torch.nn.Module, rank: int, world: int, dev: torch.device):
    """bf16 weights (replicated) + fp32 master/exp_avg/exp_avg_sq as ZeRO-1/2 partitions of one
    flat buffer: the bytes DeepSpeed's checkpoint holds, in ds_ckpt's naming."""
    named = [(n, p) for n, p in model.named_parameters()]
    total = sum(p.numel() for _, p in named)
    part = math.ceil(total / world)
    lo_r, hi_r = rank * part, min(total, (rank + 1) * part)
    flats = {k: torch.randn(hi_r - lo_r, device=dev) for k in ("master", "exp_avg", "exp_avg_sq")}
    step = torch.ones(1, device=dev)
    frs = [Fragment.whole(n, p.detach()) for n, p in named]
    pos = 0
    for n, p in named:
        lo, hi = max(lo_r, pos), min(hi_r, pos + p.numel())
        if lo < hi:
            for key, flat in flats.items():
                name = f"optimizer.{key}.{n}" if key != "master" else f"optimizer.fp32.{n}"
                frs.append(
                    Fragment(
                        name,
                        tuple(p.shape),
                        torch.float32,
                        lo - pos,
                        hi - lo,
                        flat[lo - lo_r : hi - lo_r],
                    )
                )
            if lo == pos:
                frs.append(Fragment(f"optimizer.step.{n}", (), torch.float32, 0, 1, step))
        pos += p.numel()
    return frs


MiB = 1024 * 1024
# (name, O_DIRECT, threads, request bytes) of the extra load timings; the default path is
# timed as ours_load_s
LOAD_VARIANTS = [
    ("direct-8x16MiB", True, 8, 16 * MiB),
    ("buffered-8x16MiB", False, 8, 16 * MiB),
    ("direct-16x4MiB", True, 16, 4 * MiB),
    ("buffered-16x4MiB", False, 16, 4 * MiB),
    ("direct-32x1MiB", True, 32, 1 * MiB),
]


def bench_gpu(args: argparse.Namespace) -> None:
    import deepspeed
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)  # before NCCL init: ds_ckpt gathers on the current device
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", local)
    root = args.dir
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
        os.makedirs(root)
    dist.barrier()
    torch.manual_seed(0)
    model = _GPT()
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
        "zero_optimization": {"stage": args.stage},
        "bf16": {"enabled": True},
        "steps_per_print": 10**9,
    }
    eng, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    x = torch.randint(0, 32768, (1, 1024), device=dev)
    loss = eng(x, x)  # one step, so the optimizer state exists
    eng.backward(loss)
    eng.step()
    torch.cuda.synchronize()

    def timed(fn, *a, **k) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        fn(*a, **k)
        torch.cuda.synchronize()
        dist.barrier()
        return time.perf_counter() - t0

    def cold(d: str) -> None:
        if rank == 0:
            evict(files_under(d))
        dist.barrier()

    res: dict = {
        "scenario": f"ckpt-gpu-zero{args.stage}",
        "device": device_name(),
        "world": world,
        "params": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "ds_ckpt": ds_ckpt.__version__,
        "reps": args.reps,
    }
    frs = _our_fragments(eng.module, rank, world, dev)
    t: dict[str, list[float]] = {
        k: []
        for k in (
            "ds_save_s",
            "ds_load_s",
            "ours_save_s",
            "ours_save_nohash_s",
            "ours_load_s",
            "ours_async_block_s",
            "ours_async_total_s",
        )
    }
    ds_dir, ours = os.path.join(root, "deepspeed"), os.path.join(root, "ours")
    variants: dict[str, list[float]] = {}

    def drop(d: str) -> None:  # one checkpoint on disk at a time: ~19 GB each at 1.34B
        if rank == 0:
            shutil.rmtree(d, ignore_errors=True)
        dist.barrier()

    for rep in range(args.reps):
        t["ds_save_s"].append(timed(eng.save_checkpoint, ds_dir, tag=f"r{rep}"))
        res["ds_bytes"] = du(os.path.join(ds_dir, f"r{rep}"))
        cold(ds_dir)
        t["ds_load_s"].append(timed(eng.load_checkpoint, ds_dir, tag=f"r{rep}"))
        drop(ds_dir)
        t["ours_save_s"].append(timed(ds_ckpt.save, ours, f"r{rep}", frs))
        res["ours_bytes"] = du(os.path.join(ours, f"r{rep}"))
        cold(ours)
        t["ours_load_s"].append(timed(ds_ckpt.load, ours, f"r{rep}", frs))
        cold(ours)
        # the same load with other read paths (O_DIRECT or buffered preads, threads x request
        # size): which one a disk prefers is measured here, not assumed
        for name, direct, threads, chunk in LOAD_VARIANTS:
            saved = (
                ds_ckpt_load._DIRECT_READS,
                ds_ckpt_load._READ_THREADS,
                ds_ckpt_load._READ_CHUNK,
            )
            ds_ckpt_load._DIRECT_READS = direct
            ds_ckpt_load._READ_THREADS, ds_ckpt_load._READ_CHUNK = threads, chunk
            try:
                variants.setdefault(name, []).append(timed(ds_ckpt.load, ours, f"r{rep}", frs))
            finally:
                ds_ckpt_load._DIRECT_READS, ds_ckpt_load._READ_THREADS, ds_ckpt_load._READ_CHUNK = (
                    saved
                )
            cold(ours)
        drop(ours)
        t["ours_save_nohash_s"].append(timed(ds_ckpt.save, ours, f"n{rep}", frs, hashes=False))
        drop(ours)
        t["ours_async_block_s"].append(timed(ds_ckpt.save, ours, f"a{rep}", frs, async_=True))
        t0 = time.perf_counter() - t["ours_async_block_s"][-1]
        ds_ckpt.finalize()
        dist.barrier()
        t["ours_async_total_s"].append(time.perf_counter() - t0)
        drop(ours)
    if rank == 0:
        res.update(dd(os.path.join(root, "dd.bin"), res["ours_bytes"]))
    med = {k: statistics.median(v) for k, v in t.items()}
    res.update(median_s=med, all_s=t)
    res["ds_save_GBps"] = res["ds_bytes"] / med["ds_save_s"] / 1e9
    res["ds_load_GBps"] = res["ds_bytes"] / med["ds_load_s"] / 1e9
    res["load_variants_GBps"] = {
        k: res["ours_bytes"] / statistics.median(v) / 1e9 for k, v in variants.items()
    }
    for k in ("save", "save_nohash", "load", "async_total"):
        res[f"ours_{k}_GBps"] = res["ours_bytes"] / med[f"ours_{k}_s"] / 1e9
    if rank == 0:
        res["ratios"] = {
            "save_speedup_vs_deepspeed": med["ds_save_s"] / med["ours_save_s"],
            "save_nohash_speedup_vs_deepspeed": med["ds_save_s"] / med["ours_save_nohash_s"],
            "load_speedup_vs_deepspeed": med["ds_load_s"] / med["ours_load_s"],
            **{
                f"load_{k}_speedup_vs_deepspeed": med["ds_load_s"] / statistics.median(v)
                for k, v in variants.items()
            },
            "async_block_speedup_vs_deepspeed": med["ds_save_s"] / med["ours_async_block_s"],
            "ours_save_vs_dd_write": res["ours_save_GBps"] / res["dd_write_GBps"],
            "ours_load_vs_dd_read": res["ours_load_GBps"] / res["dd_read_GBps"],
        }
        print(json.dumps(res, indent=1))
        write_result(res, res["scenario"], args.out_dir or os.environ.get("OUT"))
    dist.barrier()
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)


# ---- cpu-load: what always-on verification costs a load ------------------------------------
N_TENSORS = 24


def _numel(gb: float) -> int:
    return int(gb * 1e9 / 4 / N_TENSORS)


def worker(args: argparse.Namespace) -> None:
    """One save, or one cold + one warm load, of the cpu-load state in this fresh process; the
    timings as one JSON line on stdout."""
    import resource

    numel = _numel(args.gb)
    if args.op == "save":
        g = torch.Generator().manual_seed(0)
        frs = [
            Fragment.whole(f"layers.{i}.weight", torch.randn(numel, generator=g))
            for i in range(N_TENSORS)
        ]
        ds_ckpt.save(args.dir, "t", frs)
        print(json.dumps({"version": ds_ckpt.__version__}))
        return
    if args.no_verify:
        ds_ckpt_load._VERIFY_CHECKSUMS = False
    if args.verify_read:
        ds_ckpt_load._VERIFY_READ = args.verify_read
    if args.flip_cache_probe:
        ds_ckpt_load._PROBE_CACHE = not ds_ckpt_load._PROBE_CACHE
    if args.threads:
        ds_ckpt_load._READ_THREADS = args.threads
    dst = [torch.zeros(numel) for _ in range(N_TENSORS)]  # zeroed: page faults not timed
    frs = [Fragment.whole(f"layers.{i}.weight", t) for i, t in enumerate(dst)]
    evict(files_under(os.path.join(args.dir, "t")))
    out = {"version": ds_ckpt.__version__}
    for what in ("cold", "warm"):
        r0, t0, c0 = (
            resource.getrusage(resource.RUSAGE_SELF),
            time.perf_counter(),
            time.process_time(),
        )
        ds_ckpt.load(args.dir, "t", frs)
        # CPU seconds of all threads: what verification adds, whatever else the machine runs
        out[f"{what}_s"], out[f"{what}_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
        # user (hashing, Python) against system (page cache, copies, readahead) CPU, and context
        # switches (threads waiting: for the disk, or for the GIL)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        out[f"{what}_user_s"], out[f"{what}_sys_s"] = (
            r1.ru_utime - r0.ru_utime,
            r1.ru_stime - r0.ru_stime,
        )
        out[f"{what}_ctx_switches"] = r1.ru_nvcsw + r1.ru_nivcsw - r0.ru_nvcsw - r0.ru_nivcsw
    out["maxrss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    print(json.dumps(out))


def _run_worker(src: str | None, *argv: str) -> dict:
    env = dict(os.environ)
    env.pop("CKPT_BENCH_SRC", None)
    if src is not None:
        env["CKPT_BENCH_SRC"] = src
    r = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "_worker", *argv],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        raise RuntimeError(f"worker {argv} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _source_at(rev: str, into: str) -> str:
    """packages/ds-ckpt/src of git revision `rev`, extracted read-only into `into`."""
    repo = os.path.join(HERE, "..", "..")
    arch = subprocess.run(
        ["git", "-C", repo, "archive", rev, "packages/ds-ckpt/src"], capture_output=True, check=True
    ).stdout
    os.makedirs(into, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", into], input=arch, check=True)
    return os.path.join(into, "packages", "ds-ckpt", "src")


def bench_cpu_load(args: argparse.Namespace) -> None:
    # (here, not at the top: the workers of older revisions import this file with their own
    # ds_ckpt, which may have no _xxh3)
    import xxhash

    import ds_ckpt._xxh3 as ds_ckpt_xxh3

    root = args.dir
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    # --baseline-src: an already extracted packages/ds-ckpt/src of that revision, for machines
    # whose copy of the tree has no git history
    old_src = args.baseline_src or _source_at(args.baseline_rev, os.path.join(root, "src"))
    srcs: dict[str, str | None] = {"old": old_src, "new": None}
    if args.also_rev or args.also_src:
        # --also-rev/--also-src: one more revision's default load (e.g. this code before a
        # change to its read path), timed in the same rotation
        srcs["also"] = args.also_src or _source_at(args.also_rev, os.path.join(root, "src-also"))
    dirs = {k: os.path.join(root, k) for k in srcs}
    versions = {
        k: _run_worker(src, "save", "--dir", dirs[k], "--gb", str(args.gb))["version"]
        for k, src in srcs.items()
    }
    nbytes = _numel(args.gb) * 4 * N_TENSORS
    systems = [
        (f"ds-ckpt {versions['old']} ({args.baseline_rev}, no checksums)", old_src, "old", []),
        (f"ds-ckpt {versions['new']}, checksum verification off", None, "new", ["--no-verify"]),
        (f"ds-ckpt {versions['new']} default (XXH3-64 chunks verified)", None, "new", []),
    ]
    if "also" in srcs:
        what = args.also_rev or "--also-src"
        systems.append((f"ds-ckpt {versions['also']} ({what}) default", srcs["also"], "also", []))
    for mib in args.verify_reads:
        # the verified load with another pread size (_load._VERIFY_READ): which one a host
        # prefers is measured, not assumed
        systems.append(
            (
                f"ds-ckpt {versions['new']} default, verified in {mib:g} MiB preads",
                None,
                "new",
                ["--verify-read", str(int(mib * 2**20))],
            )
        )
    if args.cache_probe_flip:
        # the verified load with the page-cache probe before each span (_load._PROBE_CACHE) the
        # other way: on by default where the read threads outnumber the cores
        flipped = "no page-cache probe" if ds_ckpt_load._PROBE_CACHE else "with page-cache probe"
        systems.append(
            (f"ds-ckpt {versions['new']} verified, {flipped}", None, "new",
             ["--flip-cache-probe"])
        )  # fmt: skip
    for n in args.threads_variants:
        # this code's verified load with another read-thread count (_load._READ_THREADS, by
        # default one per core within [8, 16]): 8 is what the releases before 0.1.6 used
        systems.append(
            (f"ds-ckpt {versions['new']} default, {n} read threads", None, "new",
             ["--threads", str(n)])
        )  # fmt: skip
    samples: dict[str, list[dict]] = {name: [] for name, *_ in systems}
    load_avg = [os.getloadavg()]
    for rep in range(args.reps):
        k = rep % len(systems)
        for name, src, d, extra in systems[k:] + systems[:k]:  # rotate: no order bias
            samples[name].append(
                _run_worker(src, "load", "--dir", dirs[d], "--gb", str(args.gb), *extra)
            )
        load_avg.append(os.getloadavg())
        print(f"rep {rep}:", {n: round(v[-1]["cold_s"], 3) for n, v in samples.items()})
    runs = []
    for name, _, _, _ in systems:
        cold = [x["cold_s"] for x in samples[name]]
        warm = [x["warm_s"] for x in samples[name]]
        cpu = {k: [x[f"{k}_cpu_s"] for x in samples[name]] for k in ("cold", "warm")}
        runs.append(
            {
                "system": name,
                "load_s": statistics.median(cold),
                "load_warm_s": statistics.median(warm),
                "load_GBps": nbytes / statistics.median(cold) / 1e9,
                "load_warm_GBps": nbytes / statistics.median(warm) / 1e9,
                "load_cpu_s": statistics.median(cpu["cold"]),
                "load_warm_cpu_s": statistics.median(cpu["warm"]),
                "peak_mem_gb": max(x["maxrss_gb"] for x in samples[name]),
                "all_load_s": cold,
                "all_load_warm_s": warm,
                "all_load_cpu_s": cpu["cold"],
                "all_load_warm_cpu_s": cpu["warm"],
                # medians of the user/system CPU split and context switches (load_user_s: cold)
                **{
                    f"load{'_warm' if k == 'warm' else ''}_{w}": statistics.median(
                        x[f"{k}_{w}"] for x in samples[name]
                    )
                    for k in ("cold", "warm")
                    for w in ("user_s", "sys_s", "ctx_switches")
                },
            }
        )
    prev, off, default = runs[:3]
    scenario, device = "ckpt-load-verify-cpu", device_name()
    path = write_results(
        scenario=scenario,
        device=device,
        # --suffix keeps an earlier result of the same day and device
        path=default_path(scenario, device, datetime.date.today().isoformat(), args.suffix),
        runs=runs,
        ratios={
            "previous/default load_s (cold)": prev["load_s"] / default["load_s"],
            "verification-off/default load_s (cold)": off["load_s"] / default["load_s"],
            "previous/default load_warm_s": prev["load_warm_s"] / default["load_warm_s"],
            "verification-off/default load_warm_s": off["load_warm_s"] / default["load_warm_s"],
            "previous/default load_cpu_s (cold)": prev["load_cpu_s"] / default["load_cpu_s"],
            "verification-off/default load_cpu_s (cold)": off["load_cpu_s"] / default["load_cpu_s"],
            **{
                f"{r['system']} / default load{w}_s": r[f"load{w}_s"] / default[f"load{w}_s"]
                for r in runs[3:]
                for w in ("", "_warm")
            },
        },
        metric=["load_s", "load_warm_s"],
        bytes=nbytes,
        tensors=N_TENSORS,
        reps=args.reps,
        baseline_rev=args.baseline_rev,
        also_rev=args.also_rev,
        load_avg_per_rep=load_avg,
        # how this code hashes: the xxhash version and the C entry point called outside the GIL
        # (None: xxhash's Python functions, which hold the GIL before xxhash 4.0)
        xxhash=xxhash.VERSION,
        xxh3_binding=getattr(ds_ckpt_xxh3.NATIVE, "__name__", None),
        read_threads=getattr(ds_ckpt_load, "_READ_THREADS", None),
        page_cache_probe=getattr(ds_ckpt_load, "_PROBE_CACHE", None),
        note="each load in a fresh process (destination tensors zeroed before timing), cold = "
        "page cache of the checkpoint dropped with posix_fadvise, warm = the same load again; "
        f"order of the systems rotated every rep; medians over reps. This {os.cpu_count()}-core "
        "machine's load averages at each rep are in load_avg_per_rep (other jobs on a shared "
        "machine show there); ratios within this run are what to compare.",
        torch=torch.__version__,
    )
    print(json.dumps(runs, indent=1))
    print("wrote", path)
    shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        w = argparse.ArgumentParser(prog="ckpt_bench.py _worker")
        w.add_argument("op", choices=["save", "load"])
        w.add_argument("--dir", required=True)
        w.add_argument("--gb", type=float, required=True)
        w.add_argument("--no-verify", action="store_true")
        w.add_argument("--verify-read", type=int, default=0)
        w.add_argument("--flip-cache-probe", action="store_true")
        w.add_argument("--threads", type=int, default=0)
        worker(w.parse_args(sys.argv[2:]))
        return
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("mode", choices=["cpu", "cpu-load", "gpu"])
    p.add_argument("--dir", required=True, help="scratch directory on the disk under test")
    p.add_argument("--gb", type=float, default=1.5, help="cpu, cpu-load: state size in GB")
    p.add_argument("--stage", type=int, default=1, choices=[1, 2], help="gpu: ZeRO stage")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument(
        "--baseline-rev", default="42c427d", help="cpu-load: git revision of the previous code"
    )
    p.add_argument(
        "--baseline-src", default=None, help="cpu-load: that revision's ds-ckpt src, extracted"
    )
    p.add_argument(
        "--also-rev", default=None, help="cpu-load: time this git revision's default load too"
    )
    p.add_argument("--also-src", default=None, help="cpu-load: that revision's src, extracted")
    p.add_argument(
        "--verify-reads",
        type=lambda v: [float(x) for x in v.split(",") if x],
        default=[],
        help="cpu-load: also time the verified load with these pread sizes (MiB, comma-separated)",
    )
    p.add_argument(
        "--cache-probe-flip",
        action="store_true",
        help="cpu-load: also time the verified load with the page-cache probe switched the other "
        "way from this host's default",
    )
    p.add_argument(
        "--threads-variants",
        type=lambda v: [int(x) for x in v.split(",") if x],
        default=[],
        help="cpu-load: also time the verified load with these read-thread counts",
    )
    p.add_argument(
        "--suffix", default="", help="cpu-load: appended to the results file name (keeps others)"
    )
    p.add_argument("--out-dir", default=None, help="also write the JSON here")
    args = p.parse_args()
    {"cpu": bench_cpu, "cpu-load": bench_cpu_load, "gpu": bench_gpu}[args.mode](args)


if __name__ == "__main__":
    main()
