"""ds_offload AsyncIO read/write GB/s against dd with O_DIRECT on the same disk, same session.

    python benchmarks/offload/aio_bench.py --dir /tmp --size-mb 1024 --device-name cpu-dev

Each of the C++ engine's backends (``--backends kernel-aio,threads``) is measured beside dd.

Writes benchmarks/results/aio-<device>-<yyyymmdd>.json (and $OUT/ when set) in the shared
results schema (benchmarks/_results.py). Reads are O_DIRECT
on both sides (no page cache). Each figure is the best of --repeats runs.
"""

from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "packages" / "ds-offload" / "src"))
for pkg in ("ds-kernels", "ds-accel"):
    sys.path.insert(0, str(ROOT / "packages" / pkg / "src"))

import torch  # noqa: E402

from ds_offload import AsyncIO, aligned_empty  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))  # the shared results writer
from _results import write_results  # noqa: E402


def _dd(args: list[str]) -> float:
    """Run dd; returns GB/s parsed from its summary line (bytes / seconds)."""
    proc = subprocess.run(["dd", *args], capture_output=True, text=True, check=True)
    m = re.search(r"(\d+) bytes.*copied, ([\d.]+) s", proc.stderr)
    if not m:
        raise RuntimeError(f"cannot parse dd output: {proc.stderr}")
    return int(m.group(1)) / float(m.group(2)) / 1e9


def dd_write(path: Path, size_mb: int, bs_mb: int) -> float:
    return _dd(
        [
            "if=/dev/zero",
            f"of={path}",
            f"bs={bs_mb}M",
            f"count={size_mb // bs_mb}",
            "oflag=direct",
            "conv=notrunc",
        ]
    )


def dd_read(path: Path, size_mb: int, bs_mb: int) -> float:
    return _dd(
        [f"if={path}", "of=/dev/null", f"bs={bs_mb}M", f"count={size_mb // bs_mb}", "iflag=direct"]
    )


def aio_rw(path: Path, buf: torch.Tensor, aio: AsyncIO, write: bool) -> float:
    nbytes = buf.numel() * buf.element_size()
    t0 = time.perf_counter()
    if write:
        aio.pwrite(buf, path)
    else:
        aio.pread(buf, path)
    return nbytes / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--block-mb", type=int, default=1)
    ap.add_argument("--queue-depth", type=int, default=8)
    ap.add_argument("--thread-count", type=int, default=1)
    ap.add_argument("--device-name", default=socket.gethostname())
    ap.add_argument("--engine", default="native", choices=["native", "python"])
    ap.add_argument("--backends", default="kernel-aio,threads",
                    help="native engine backends to measure (comma-separated)")  # fmt: skip
    args = ap.parse_args()

    d = Path(args.dir)
    dd_path, aio_path = d / "ds_aio_bench_dd.bin", d / "ds_aio_bench_aio.bin"
    buf = aligned_empty(args.size_mb << 20, torch.uint8, pin=True)
    buf.fill_(7)
    backends = args.backends.split(",") if args.engine == "native" else ["python"]
    handles = {
        b: AsyncIO(
            block_size=args.block_mb << 20,
            queue_depth=args.queue_depth,
            thread_count=args.thread_count,
            engine=args.engine,
            **({"native_backend": b} if args.engine == "native" else {}),
        )  # fmt: skip
        for b in backends
    }
    res: dict[str, list[float]] = {"dd_write": [], "dd_read": []}
    for b in backends:
        res[f"aio_{b}_write"], res[f"aio_{b}_read"] = [], []
    try:
        for _ in range(args.repeats):  # interleaved so all see the same disk conditions
            res["dd_write"].append(dd_write(dd_path, args.size_mb, args.block_mb))
            for b, aio in handles.items():
                res[f"aio_{b}_write"].append(aio_rw(aio_path, buf, aio, write=True))
            res["dd_read"].append(dd_read(dd_path, args.size_mb, args.block_mb))
            for b, aio in handles.items():
                res[f"aio_{b}_read"].append(aio_rw(aio_path, buf, aio, write=False))
    finally:
        for aio in handles.values():
            aio.close()
        for p in (dd_path, aio_path):
            p.unlink(missing_ok=True)
    best = {k: round(max(v), 3) for k, v in res.items()}
    # the headline: the engine's default choice (kernel AIO where available) against dd
    head = backends[0]
    runs = [{"system": "dd (O_DIRECT)", "write_gbps": best["dd_write"],
             "read_gbps": best["dd_read"], "peak_mem_gb": None}]  # fmt: skip
    ratios = {
        "ds-offload/dd write_gbps": round(best[f"aio_{head}_write"] / best["dd_write"], 3),
        "ds-offload/dd read_gbps": round(best[f"aio_{head}_read"] / best["dd_read"], 3),
    }
    for b in backends:
        system = f"ds-offload AsyncIO ({b})"
        runs.append({"system": system, "write_gbps": best[f"aio_{b}_write"],
                     "read_gbps": best[f"aio_{b}_read"], "peak_mem_gb": None})  # fmt: skip
        for op in ("write", "read"):
            ratios[f"{system}/dd {op}_gbps"] = round(best[f"aio_{b}_{op}"] / best[f"dd_{op}"], 3)
    path = write_results(
        scenario="aio",
        device=args.device_name,
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
        path=ROOT
        / "benchmarks"
        / "results"
        / f"aio-{args.device_name}-{time.strftime('%Y%m%d')}.json",
        metric=["write_gbps", "read_gbps"],
        dir=str(d),
        size_mb=args.size_mb,
        block_mb=args.block_mb,
        queue_depth=args.queue_depth,
        thread_count=args.thread_count,
        engine=args.engine,
        backends={b: h.backend for b, h in handles.items()},
        gbps_all={k: [round(x, 3) for x in v] for k, v in res.items()},
        runs=runs,
        ratios=ratios,
    )
    print(path.read_text())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
