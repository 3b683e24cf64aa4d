"""compressed_allreduce (1-bit, error feedback) against NCCL all_reduce of the same fp32 tensor,
in the same run, on 2 GPUs:

    torchrun --nproc_per_node 2 benchmarks/comm/compressed_allreduce_bench.py [--mb 256]

``--cpu --mb 4`` smoke-tests the script with gloo on a CPU machine (nothing written to results).

Reports per call: median time (CUDA events, after warmup), bytes on the wire per rank (ring
model: 2(n-1)/n * 4N for fp32 all-reduce; 2(n-1)/n * N/8 signs + 2(n-1) fp32 scales for the
compressed one), effective bandwidth (fp32 tensor bytes / time: how fast the *tensor* is averaged)
and wire bandwidth (wire bytes / time). Also the relative error of one compressed call against the
exact mean. Rank 0 writes benchmarks/results/comm-compressed-allreduce-<device>-<yyyymmdd>.json
(the shared results schema, benchmarks/_results.py) and a copy under $OUT when set.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

import ds_comm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared results writer
from _results import write_results  # noqa: E402
from _timing import cuda_times_s  # noqa: E402


def _time(fn, warmup: int, iters: int, cuda: bool) -> list[float]:
    """Seconds per call, every rank starting each call together (a barrier ahead of it)."""
    if cuda:
        return cuda_times_s(fn, warmup, iters, before=dist.barrier)
    for _ in range(warmup):  # --cpu smoke mode (gloo): wall clock
        fn()
    times = []
    for _ in range(iters):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description="compressed_allreduce vs NCCL all_reduce")
    ap.add_argument("--mb", type=int, default=256, help="fp32 tensor size in MiB")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--cpu", action="store_true", help="smoke-test the script with gloo on CPU")
    a = ap.parse_args()

    cuda = not a.cpu
    layout = ds_comm.init_distributed("gloo" if a.cpu else None)  # nccl on CUDA via ds_accel
    n, r = layout.world_size, layout.rank
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    numel = a.mb * 1024 * 1024 // 4
    g = torch.Generator(device=device).manual_seed(r)
    src = torch.randn(numel, device=device, generator=g)
    buf = torch.empty_like(src)

    def nccl() -> None:
        buf.copy_(src)
        dist.all_reduce(buf)

    ef = ds_comm.ErrorFeedback()
    comm = ds_comm.TorchComm()

    def compressed() -> None:
        buf.copy_(src)
        ds_comm.compressed_allreduce(buf, ef, comm=comm)

    def copy_only() -> None:
        buf.copy_(src)

    t_copy = _time(copy_only, a.warmup, a.iters, cuda)
    t_nccl = _time(nccl, a.warmup, a.iters, cuda)
    t_comp = _time(compressed, a.warmup, a.iters, cuda)
    t_nccl2 = _time(nccl, 2, a.iters, cuda)  # again after, to see drift

    exact = src.clone()
    dist.all_reduce(exact)
    exact /= n
    one = src.clone()
    ds_comm.compressed_allreduce(one, ds_comm.ErrorFeedback(), comm=comm)
    rel_err = (torch.linalg.vector_norm(one - exact) / torch.linalg.vector_norm(exact)).item()

    wire = ds_comm.compressed_wire_bytes(numel, n)
    copy_s = statistics.median(t_copy)
    res = {}
    for name, ts, wire_bytes in (
        ("nccl_all_reduce", t_nccl + t_nccl2, wire["fp32_allreduce"]),
        ("compressed_allreduce", t_comp, wire["signs"] + wire["scales"]),
    ):
        med = statistics.median(ts) - copy_s  # the input copy is not part of the collective
        res[name] = {
            "median_s": med,
            "min_s": min(ts) - copy_s,
            "wire_bytes_per_rank": wire_bytes,
            "effective_GBps": numel * 4 / med / 1e9,
            "wire_GBps": wire_bytes / med / 1e9,
        }
    if r == 0:
        name = torch.cuda.get_device_name(device) if cuda else "cpu-gloo-smoke"
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        today = _dt.date.today()
        systems = {"nccl_all_reduce": f"{dist.get_backend()} all_reduce (fp32)",
                   "compressed_allreduce": "ds_comm.compressed_allreduce (1-bit)"}  # fmt: skip
        runs = [{"system": systems[k], "step_s": v.pop("median_s"), "peak_mem_gb": None, **v}
                for k, v in res.items()]  # fmt: skip
        fname = f"comm-compressed-allreduce-{slug}-{today:%Y%m%d}.json"
        root = Path(__file__).resolve().parents[1] / "results"
        # smoke runs (CPU) do not go into the results folder, only to $OUT
        path = write_results(
            scenario="comm-compressed-allreduce",
            device=f"{n} x {name}",
            date=today.isoformat(),
            path=(root if cuda else Path(os.environ.get("OUT") or tempfile.mkdtemp())) / fname,
            torch=torch.__version__,
            backend=dist.get_backend(),
            nccl=".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
            tensor_MiB=a.mb,
            numel=numel,
            iters=a.iters,
            one_call_relative_error=rel_err,
            input_copy_median_s=copy_s,
            runs=runs,
            ratios={
                f"{runs[1]['system']}/{runs[0]['system']} speed": runs[0]["step_s"]
                / runs[1]["step_s"],
                "wire bytes fp32/compressed": wire["fp32_allreduce"]
                / (wire["signs"] + wire["scales"]),
            },
        )
        print(path.read_text())
    ds_comm.destroy_process_group()


if __name__ == "__main__":
    main()
