"""ZeRO++ quantizer kernels on one GPU: ds-kernels' `quantizer` op against DeepSpeed 0.19.8's.

Same input tensors (fp16, since DeepSpeed's quantize kernel reads fp16; bf16 for ours as well),
64 MB to 2 GB each:

* qwZ weights: ours `quantize_blockwise(x, 8, 4096)` / `dequantize_blockwise` vs DeepSpeed's
  `CUDAQuantizer` (the class ZeRO-3 uses for `zero_quantized_weights`: adaptive groups of 4k-8k,
  int8 symmetric, `QuantizerBuilder().load().quantize/dequantize`);
* qgZ gradients: ours int4 with 256-element blocks (what ds-zero's qgZ sends) vs DeepSpeed's
  `swizzle_quant(x, groups, 4, Symmetric, 1, nodes, devices_per_node)` (the first step of
  `all_to_all_quant_reduce`) with the same group size, and its int4 `dequantize`.

Bandwidth counts bytes read + written (input, codes, scales); the reference is a plain
`copy_` of the input measured in the same run (its read + write bandwidth), so `pct_hbm` is the
fraction of what this GPU's memory actually delivers. Times: CUDA events around each call,
median of `--reps`; the calls are queued back to back (the host runs ahead, so Python and launch
overhead are not counted, as in a training step's stream, where the next kernels are queued
while earlier ones run), with a 256 MB write between them that evicts L2. Results up to
2026-12-06 (H100, first run) waited for each call before queueing the next, which counted the
launch overhead of both systems and cost the 64 MB figures most. Since 2026-12-07 (the
`...-held.json` run) a spin kernel holds the GPU while the calls are queued (`_Timer`): before,
a host slower than the L2-evicting write let a call's first event fire before its kernel was
queued, and a few 64 MB figures counted host time. The host side is measured on its own:
`host_us`, host microseconds per call (Python, checks, allocations, launch) of every op, ours
and DeepSpeed's; for our quantize also the launch alone (`host_us_launch_only`) and the whole
op launched through Triton's JIT instead (`host_us_jit_launch`). Small buckets (64 KB to 4 MB,
`--small-sizes-kb`), where the host rather than the GPU sets the pace, are timed per call with
the host's time included (`call_us`: calls queued back to back, waited for once).
Goals: every ds-kernels op at >= 70% of the copy bandwidth, and faster than DeepSpeed's.

DeepSpeed's quantizer op is compiled (JIT, nvcc, several minutes) on first use, so it is built
first, in a child process with its own time limit (`--ds-build-timeout-s`, default 400 s;
`TORCH_CUDA_ARCH_LIST` from the GPU, `MAX_JOBS` from the core count, unless already set);
the timed part then loads the cached build. A build that fails or runs out of time is recorded
as a DeepSpeed run with its error, and our figures are still written. `--build-only` runs just
that step (exit status 1 if it failed), so a session can build under one limit and time under
another.

    python benchmarks/zero/quant_bench.py [--sizes-mb 64,256,1024,2048] [--reps 10]
    python benchmarks/zero/quant_bench.py --build-only          # DeepSpeed's op, then exit
    python benchmarks/zero/quant_bench.py --dry-run             # CPU: every step, tiny sizes
    python benchmarks/zero/quant_bench.py --sweep               # + launch shapes and variants

The real DeepSpeed must be importable (the GPU machines install it in /tmp/site); ds-deepspeed's
src/ (the `deepspeed` alias of this project) is dropped from the path before it is imported.
`--dry-run` runs the same steps on the CPU (our fallback op timed with perf_counter, DeepSpeed's
build attempted, results written to a temporary folder unless `--out` says otherwise).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _pythonpath import ALIAS_SRC, pythonpath  # noqa: E402
from _results import write_results  # noqa: E402

import ds_kernels  # noqa: E402

GOAL_PCT_HBM = 70.0

# What the child runs: DeepSpeed's JIT build of the quantizer op, nothing else. The alias
# package is taken off sys.path there too (an editable install puts it back through a .pth).
_BUILD_SCRIPT = """
import os, sys, time
from pathlib import Path
alias = Path(os.environ["QUANT_BENCH_ALIAS_SRC"])
sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != alias]
t0 = time.perf_counter()
import deepspeed
if alias in Path(deepspeed.__file__).resolve().parents:
    sys.exit(f"DeepSpeed is not installed: 'import deepspeed' found this project's alias only")
from deepspeed.ops.op_builder import QuantizerBuilder
QuantizerBuilder().load(verbose=False)
print(f"deepspeed {deepspeed.__version__} quantizer op ready in {time.perf_counter() - t0:.1f} s")
"""


@dataclass
class BuildResult:
    """How DeepSpeed's quantizer op build went (recorded in the results' config)."""

    ok: bool
    seconds: float
    limit_s: float
    torch_cuda_arch_list: str
    max_jobs: str
    error: str | None = None
    log_tail: str = ""


def _build_env() -> dict[str, str]:
    """The build settings, put in os.environ so the child and this process agree: DeepSpeed's
    JIT versioner compares the nvcc flags (arch list included), and a mismatch would rebuild."""
    if "TORCH_CUDA_ARCH_LIST" not in os.environ:
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    env = dict(os.environ)
    env["PYTHONPATH"] = pythonpath(alias=False)
    env["QUANT_BENCH_ALIAS_SRC"] = str(ALIAS_SRC)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _clear_stale_lock() -> None:
    """A build killed at its limit leaves torch's extension lock file behind, which would make
    the next load wait on it forever."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        lock = Path(_get_build_directory("quantizer", verbose=False)) / "lock"
        lock.unlink(missing_ok=True)
    except Exception:  # noqa: BLE001 - best effort; the error is already recorded
        pass


def build_deepspeed_op(limit_s: float) -> BuildResult:
    """Build (or find cached) DeepSpeed's quantizer op in a child process within ``limit_s``."""
    env = _build_env()
    arch, jobs = env["TORCH_CUDA_ARCH_LIST"], env["MAX_JOBS"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", _BUILD_SCRIPT],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: nvcc and ninja go with it at the limit
    )
    try:
        out, _ = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        _clear_stale_lock()
        seconds = time.perf_counter() - t0
        return BuildResult(False, round(seconds, 1), limit_s, arch, jobs,
                           f"DeepSpeed's quantizer op build did not finish in {limit_s:.0f} s "
                           "(raise --ds-build-timeout-s)", _tail(out))  # fmt: skip
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        lines = [ln for ln in (out or "").splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit status {proc.returncode}"
        return BuildResult(False, round(seconds, 1), limit_s, arch, jobs,
                           f"DeepSpeed's quantizer op failed to build/load: {last}",
                           _tail(out))  # fmt: skip
    return BuildResult(True, round(seconds, 1), limit_s, arch, jobs, None, _tail(out))


def _tail(text: str | None, lines: int = 15) -> str:
    return "\n".join((text or "").splitlines()[-lines:])


def _load_deepspeed():
    """DeepSpeed's quantizer module (already built) and qwZ's CUDAQuantizer, or the reason why
    not. The real DeepSpeed only: the alias package of this checkout is taken off the path."""
    sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != ALIAS_SRC]
    try:
        import deepspeed

        where = Path(deepspeed.__file__).resolve()
        if ALIAS_SRC in where.parents:
            return None, None, f"imported this project's deepspeed alias ({where}), not DeepSpeed"
        from deepspeed.ops.op_builder import QuantizerBuilder
        from deepspeed.runtime.zero.partition_parameters import CUDAQuantizer

        module = QuantizerBuilder().load()
        return module, CUDAQuantizer(), None
    except Exception as exc:  # noqa: BLE001 - reported in the results
        return None, None, f"{type(exc).__name__}: {exc}"


_L2_FLUSH_BYTES = 256 * 2**20  # more than any current GPU's L2 (H100: 50 MB, B200: 126 MB)


class _Timer:
    """Median milliseconds of ``fn`` over ``reps`` calls after 3 warm-ups: CUDA events on a GPU,
    perf_counter on the CPU (--dry-run).

    On a GPU the calls are queued without waiting in between, so each pair of events brackets
    the kernels alone, not the Python and launch overhead before them (as in a training step's
    stream, where the next kernels are queued while earlier ones run). A 256 MB write between
    calls evicts the last call's tensors from L2, so every call reads from HBM. While the calls
    are queued, the GPU is held by a spin kernel (``torch.cuda._sleep``): without it, a host
    slower than that write lets the GPU reach a call's first event before its kernel is queued,
    and the event pair then counts host time. Whether the hold outlasted the queueing is
    checked; if not, the measurement is repeated with a 4x longer hold (twice at most), and
    ``host_bound`` counts measurements whose last try still outran the hold.
    ``host_us`` measures the other side: host microseconds per call of ``fn``."""

    #: spin cycles of the hold per queued call: 0.5 ms at 2 GHz, several times what a host
    #: needs to queue one call with its flush and events
    _HOLD_CYCLES_PER_CALL = 1_000_000

    def __init__(self, device: str) -> None:
        self.device: str = device
        self.host_bound: int = 0
        self._flush: torch.Tensor | None = (
            torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device)
            if device == "cuda"
            else None
        )

    def __call__(self, fn: Callable[[], object], reps: int) -> float:
        for _ in range(3):
            fn()
        if self.device != "cuda":
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)
        hold = self._HOLD_CYCLES_PER_CALL * reps
        for _ in range(3):
            torch.cuda.synchronize()
            events = [
                (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                for _ in range(reps)
            ]
            held = torch.cuda.Event()
            torch.cuda._sleep(hold)
            held.record()
            for a, b in events:
                self._flush.zero_()
                a.record()
                fn()
                b.record()
            outran = held.query()  # the hold ended before the last call was queued
            torch.cuda.synchronize()
            if not outran:
                break
            hold *= 4
        else:
            self.host_bound += 1
        return statistics.median(a.elapsed_time(b) for a, b in events)

    def host_us(self, fn: Callable[[], object], calls: int = 100) -> float:
        """Host microseconds per call of ``fn`` (Python, argument checks, allocations, the
        launch), ``calls`` calls queued without waiting for the GPU (held meanwhile, so that a
        full launch queue never blocks the host)."""
        fn()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda._sleep(self._HOLD_CYCLES_PER_CALL * calls)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        us = (time.perf_counter() - t0) * 1e6 / calls
        if self.device == "cuda":
            torch.cuda.synchronize()
        return us


def _sweep_quant(
    x, weight_block, grad_block, reps, time_ms, record, record_error, size_mb, copy_gbps
) -> None:
    """The quantize kernels launched directly at other shapes: warps per program x blocks per
    program (BPP; the default launch is in ds_kernels._quant_triton._launch), outputs allocated
    once, to find the shape this GPU prefers; then the launch variants (``_sweep_variants``);
    then dequantize with codes made fp32 by a conversion instruction instead of the exponent
    trick (``_biased_to_float``), ``sweep-*-dequantize-fp16-convert`` against ``-magic``.
    int8 with the weight block, int4 with the gradient block."""
    from ds_kernels import _quant_triton as qt
    from ds_kernels._quant_op import code_numel, num_blocks

    n = x.numel()
    rows = x.view(1, n)
    codes_how = qt._launch(weight_block, 1, 1, 8)[1]["CODES"]  # the default's, in any Triton
    for bits, block, bpps in ((8, weight_block, (1, 2)), (4, grad_block, (8, 16, 32))):
        nb = num_blocks(n, block)
        c = n if bits == 8 else code_numel(n, 4)
        codes = torch.empty(1, c, dtype=torch.int8 if bits == 8 else torch.uint8, device=x.device)
        scales = torch.empty(1, nb, dtype=torch.float32, device=x.device)
        kernel = qt._quant8_kernel if bits == 8 else qt._quant4_kernel
        sizes = (n, nb) if bits == 8 else (n, c, nb)
        what = "qwz" if bits == 8 else "qgz"
        for bpp in bpps:
            for warps in (1, 2, 4, 8):
                nbp = -(-nb // bpp)

                def fn(
                    bpp=bpp, warps=warps, nbp=nbp, k=kernel, sz=sizes, cd=codes, sc=scales, b=block
                ):
                    k[(nbp, 1)](rows, cd, sc, *sz, BLOCK=b, BPP=bpp, CODES=codes_how,
                                num_warps=warps, **qt._LAUNCH)  # fmt: skip

                ms = time_ms(fn, reps)
                record(f"sweep-{what}-quantize-fp16-w{warps}-bpp{bpp}", size_mb, ms,
                       _nbytes(x, codes, scales), copy_gbps, bits=bits, block=block)  # fmt: skip
        t0 = time.perf_counter()
        count = _sweep_variants(x, bits, block, codes, scales, reps, time_ms, record, record_error,
                                size_mb, copy_gbps)  # fmt: skip
        print(f"sweep: {count} {what} launch variants at {size_mb} MB in "
              f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
        _sweep_dequant(x, bits, block, reps, time_ms, record, record_error, size_mb, copy_gbps)


def _sweep_dequant(x, bits, block, reps, time_ms, record, record_error, size_mb, copy_gbps):
    """Dequantize of ``x``'s codes, the default launch with and without the exponent trick: each
    output checked bit for bit against the default's first, then timed."""
    from ds_kernels import _quant_triton as qt

    what = "qwz" if bits == 8 else "qgz"
    n = x.numel()
    codes, scales = qt.quantize_rows(x.view(1, n), bits, block)
    want = qt.dequantize_rows(codes, scales, bits, block, n, x.dtype)
    grid, kw = qt._launch(block, scales.shape[1], 1)
    kernel = qt._dequant8_kernel if bits == 8 else qt._dequant4_kernel
    sizes = (n, scales.shape[1]) if bits == 8 else (n, codes.shape[1], scales.shape[1])
    out = torch.empty_like(want)
    for magic in (True, False):
        system = f"sweep-{what}-dequantize-fp16-{'magic' if magic else 'convert'}"

        def fn(magic=magic):
            kernel[grid](codes, scales, out, *sizes, **{**kw, "MAGIC": magic})

        try:
            out.fill_(float("nan"))
            fn()
            if not torch.equal(out, want):
                record_error(system, size_mb, "not bit-identical to the default dequantize: "
                             f"{int((out != want).sum())} of {n} values differ",
                             bits=bits, block=block)  # fmt: skip
                continue
            record(system, size_mb, time_ms(fn, reps), _nbytes(out, codes, scales), copy_gbps,
                   bits=bits, block=block, magic=magic)  # fmt: skip
        except Exception:  # noqa: BLE001 - recorded; the sweep goes on
            record_error(system, size_mb, traceback.format_exc(limit=3), bits=bits, block=block)


# Launch variants of the quantize kernels (ds_kernels._quant_triton.Launch), as (warps, blocks per
# program or 0 for the default, Launch fields): the absmax reduced in fp32 (the order before
# ds-kernels 0.1.10) and cache hints on the default shape, and persistent
# grids of g programs per SM looping over the tiles, software-pipelined over `stages` tiles. The
# main persistent grid per warp count has 16 warps an SM (w2-g8, w4-g4, w8-g2), which fits an
# H100/H200 at fp16 (Triton 3.6 for sm_90: up to 128 registers a thread, (stages - 1) x 8 KB of
# shared memory a program); each run records `resident_per_sm`, how many such programs fit.
# About 20 in all: each costs one check and 3 + --reps calls per size, plus one compile.
_VARIANTS = {
    8: (
        (2, 0, dict(codes="floor")),  # floor, then convert (before 0.1.11)
        (2, 0, dict(codes="rmi")),  # one cvt.rmi (a conversion instruction)
        (2, 0, dict(wide_absmax=True)),  # the absmax reduced in fp32 (before 0.1.10)
        # register caps: more programs an SM (2 warps: 16 at 64 registers, 12 at 80; 4 warps:
        # 8 at 64; 1 warp: 21 at 96)
        (2, 0, dict(max_registers=64)),
        (2, 0, dict(max_registers=80)),
        (4, 0, dict(max_registers=64)),
        (1, 0, dict(max_registers=96)),
        # no bounds masks (every tile full at these sizes)
        (2, 0, dict(unmasked=True)),
        (4, 0, dict(unmasked=True)),
        (2, 0, dict(unmasked=True, max_registers=64)),
        (2, 0, dict(evict=True)),
        (2, 0, dict(programs_per_sm=8, stages=1)),  # persistent, not pipelined
        *((w, 0, dict(programs_per_sm=g, stages=s)) for s in (2, 3, 4)
          for w, g in ((2, 8), (4, 4), (8, 2))),
        (4, 0, dict(programs_per_sm=8, stages=3)),  # 32 warps an SM
        (2, 0, dict(programs_per_sm=4, stages=3)),  # 8 warps an SM
        (4, 0, dict(programs_per_sm=4, stages=3, evict=True)),
    ),
    4: (
        (2, 8, dict(codes="floor")),
        (2, 8, dict(codes="rmi")),
        (4, 0, dict(wide_absmax=True)),
        (2, 8, dict(max_registers=96)),
        (4, 0, dict(unmasked=True)),
        (2, 8, dict(unmasked=True)),
        (2, 8, dict(programs_per_sm=8, stages=3)),
        (4, 0, dict(evict=True)),
        *((4, 0, dict(programs_per_sm=4, stages=s)) for s in (2, 3, 4)),
        (8, 0, dict(programs_per_sm=2, stages=3)),
        (2, 0, dict(programs_per_sm=8, stages=3)),
    ),
}  # fmt: skip


def _variant_name(launch, warps: int, bpp: int) -> str:
    """`evict-w2-bpp1`, `plain-wide-w2-bpp1`, `plain-r64-w2-bpp1`, `plain-magic-w2-bpp1`,
    `persist-s3-w4-g2`, `persist-evict-s3-w4-g4`."""
    from ds_kernels._quant_triton import _PLAIN_CODES

    wide = "-wide" if launch.wide_absmax else ""
    wide += f"-r{launch.max_registers}" if launch.max_registers else ""
    wide += "-u" if launch.unmasked else ""
    wide += f"-{launch.codes}" if launch.codes != _PLAIN_CODES else ""
    if launch.programs_per_sm:
        kind = "persist-evict" if launch.evict else "persist"
        return f"{kind}{wide}-s{launch.stages}-w{warps}-g{launch.programs_per_sm}"
    kind = "evict" if launch.evict else "plain"
    return f"{kind}{wide}-w{warps}-bpp{bpp}"


def _resident_per_sm(compiled, device) -> int | None:
    """Programs of a compiled Triton kernel that fit on one SM at once (registers, threads,
    shared memory, 32 blocks), from its resource use; None where unknown (the interpreter)."""
    try:
        regs, smem, warps = compiled.n_regs, compiled.metadata.shared, compiled.metadata.num_warps
        props = torch.cuda.get_device_properties(device)
    except Exception:  # noqa: BLE001 - best effort: only recorded
        return None
    regs_per_warp = -(-max(1, regs) * 32 // 256) * 256
    fits = [
        getattr(props, "regs_per_multiprocessor", 65536) // (regs_per_warp * warps),
        getattr(props, "max_threads_per_multi_processor", 2048) // (32 * warps),
        32,
    ]
    if smem:  # plus the 1 KB the driver reserves per block
        fits.append(getattr(props, "shared_memory_per_multiprocessor", 233472) // (smem + 1024))
    return min(fits)


def _sweep_variants(
    x, bits, block, codes, scales, reps, time_ms, record, record_error, size_mb, copy_gbps
) -> int:
    """Each launch variant at `bits`: first run once into outputs filled with a value no launch
    writes (codes -128 / 0x88, scales NaN) and compared bit for bit with the default launch's
    output on the same tensor, then timed; a variant that differs, or fails, is recorded as an
    error run and the sweep goes on. Returns the number of variants tried."""
    from ds_kernels import _quant_triton as qt

    what = "qwz" if bits == 8 else "qgz"
    rows = x.view(1, -1)
    try:
        ref_codes, ref_scales = qt.quantize_rows(rows, bits, block)
    except Exception:  # noqa: BLE001
        record_error(f"sweep-{what}-quantize-fp16-default", size_mb,
                     traceback.format_exc(limit=3), bits=bits, block=block)  # fmt: skip
        return 0
    sentinel = -128 if bits == 8 else 0x88  # never a code: nibbles and codes are in [-qmax, qmax]
    sms = qt.sm_count(x.device)
    for warps, bpp, fields in _VARIANTS[bits]:
        bpp = bpp or qt.Launch(1).blocks(block)  # 0: a 4096-value tile
        tile = block * bpp
        system = f"sweep-{what}-quantize-fp16-invalid-w{warps}-bpp{bpp}"
        try:
            launch = qt.Launch(values_per_thread=max(1, tile // (32 * warps)),
                               blocks_per_program=bpp, **fields)  # fmt: skip
            if launch.num_warps(tile) != warps:
                raise ValueError(f"{warps} warps is not a launch of a {tile}-value tile")
            system = f"sweep-{what}-quantize-fp16-{_variant_name(launch, warps, bpp)}"
            grid, _ = qt._launch(block, scales.shape[1], 1, bits, launch, sms)
            extra = dict(bits=bits, block=block, warps=warps, bpp=bpp, grid=grid[0],
                         programs_per_sm=launch.programs_per_sm, stages=launch.stages,
                         evict=launch.evict, wide_absmax=launch.wide_absmax,
                         max_registers=launch.max_registers,
                         unmasked=launch.unmasked,
                         codes=launch.codes)  # fmt: skip
            codes.fill_(sentinel)
            scales.fill_(float("nan"))
            compiled = qt.quantize_into(rows, codes, scales, bits, block, launch, sms)
            if not (torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)):
                bad_c = int((codes != ref_codes).sum())
                bad_s = int((scales != ref_scales).sum())  # NaN (not written) counts
                record_error(system, size_mb,
                             f"not bit-identical to the default launch: {bad_c} of "
                             f"{codes.numel()} code bytes and {bad_s} of {scales.numel()} "
                             "scales differ", **extra)  # fmt: skip
                continue
            extra["resident_per_sm"] = _resident_per_sm(compiled, x.device)

            def fn(launch=launch):
                qt.quantize_into(rows, codes, scales, bits, block, launch, sms)

            ms = time_ms(fn, reps)
            record(system, size_mb, ms, _nbytes(x, codes, scales), copy_gbps, **extra)
        except Exception:  # noqa: BLE001 - recorded; the other variants still run
            record_error(system, size_mb, traceback.format_exc(limit=3), bits=bits, block=block)
    del ref_codes, ref_scales
    return len(_VARIANTS[bits])


def _triton_version() -> str | None:
    """Triton's version (its code generation decides the kernels' registers), None if absent."""
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes-mb", default=None, help="fp16 input sizes (default 64,256,1024,2048;"
                    " --dry-run: 1)")  # fmt: skip
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--grad-block", type=int, default=256)
    ap.add_argument("--weight-block", type=int, default=4096)
    ap.add_argument("--nodes", type=int, default=2, help="swizzle layout: nodes")
    ap.add_argument("--devices-per-node", type=int, default=8, help="swizzle layout")
    ap.add_argument("--ds-build-timeout-s", type=float, default=400.0,
                    help="limit of DeepSpeed's quantizer op build (the child process)")  # fmt: skip
    ap.add_argument("--no-deepspeed", action="store_true", help="time ours only")
    ap.add_argument("--sweep", action="store_true",
                    help="also time the int8 and int4 quantize kernels at other launch shapes "
                    "(warps x blocks per program) and launch variants (cache hints, persistent "
                    "pipelined grids; each checked bit for bit against the default launch "
                    "first), recorded as sweep-* runs; on the CPU with --dry-run only under "
                    "TRITON_INTERPRET=1")  # fmt: skip
    ap.add_argument("--small-sizes-kb", default="64,256,1024,4096",
                    help="fp16 bucket sizes (KB) timed per call, host time included (CUDA "
                    "only; '' for none)")  # fmt: skip
    ap.add_argument("--build-only", action="store_true",
                    help="build DeepSpeed's op and exit (status 1 if it failed)")  # fmt: skip
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU: every step with tiny sizes; results to a temporary folder")  # fmt: skip
    ap.add_argument("--out", default=None, help="results file or folder (default: "
                    "benchmarks/results/; --dry-run: a temporary folder)")  # fmt: skip
    args = ap.parse_args(argv)
    args.sizes_mb = args.sizes_mb or ("1" if args.dry_run else "64,256,1024,2048")
    try:
        sizes = [int(s) for s in args.sizes_mb.split(",")]
    except ValueError:
        ap.error(f"--sizes-mb takes comma-separated whole megabytes, got {args.sizes_mb!r}")
    if not sizes or min(sizes) < 1:
        ap.error(f"--sizes-mb: sizes must be >= 1 MB, got {args.sizes_mb!r}")
    args.sizes = sizes
    try:
        args.small_sizes_kb = [int(s) for s in args.small_sizes_kb.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--small-sizes-kb takes comma-separated whole KB, got {args.small_sizes_kb!r}")
    if args.reps < 1:
        ap.error(f"--reps must be >= 1, got {args.reps}")
    for name in ("grad_block", "weight_block"):
        b = getattr(args, name)
        if b < 2 or b & (b - 1) or b > 65536:
            ap.error(f"--{name.replace('_', '-')} must be a power of two in [2, 65536], got {b}")
    if args.nodes < 1 or args.devices_per_node < 1:
        ap.error("--nodes and --devices-per-node must be >= 1")
    return args


def _fp16_numel(nbytes: int, args: argparse.Namespace) -> int:
    """fp16 values in ``nbytes``, rounded down to whole swizzle layouts (what DeepSpeed's
    ``swizzle_quant`` needs for ``--nodes`` x ``--devices-per-node`` at ``--grad-block``)."""
    n = nbytes // 2
    return n - n % (args.devices_per_node * args.nodes * max(args.grad_block, 16) * 8)


def _host_breakdown(op, x, codes, scales, bits: int, block: int, host_us) -> dict[str, float]:
    """Where our quantize's host time goes: the kernel's launch alone through the launcher the
    op uses (plan built, outputs allocated once: ``host_us_launch_only``), and the whole op with
    every launch through Triton's JIT instead (``host_us_jit_launch``), as before 0.1.13."""
    from ds_kernels._quant_op import TritonQuantizer

    kernels = op.kernels()
    n = x.shape[-1]
    nb = scales.shape[-1]
    sizes = (n, nb) if bits == 8 else (n, codes.shape[-1], nb)
    plan = kernels.plan(bits, block, n, x.numel() // n)
    launch = functools.partial(kernels.launchers[bits], plan, x, codes, scales, *sizes)
    return {
        "host_us_launch_only": round(host_us(launch), 1),
        "host_us_jit_launch": round(host_us(functools.partial(
            TritonQuantizer(direct=False).quantize, x, bits, block)), 1),
        # launches that went straight to the compiled kernel so far (0: every one went through
        # Triton's JIT: direct launches off, turned off by their check, or a hook installed)
        "direct_launches": kernels.launchers[bits].direct_launches,
    }  # fmt: skip


def _small_buckets(op, ds_mod, ds_cuda_quantizer, sizes_kb, args, runs, ratios) -> None:
    """Small buckets, where the host sets the pace: wall microseconds per call of 200 calls
    queued back to back and waited for once (``call_us``), ours and DeepSpeed's, on the same
    fp16 tensors, plus their ``host_us``. The ratios are DeepSpeed's time over ours."""
    sym = ds_mod.Symmetric if ds_mod is not None else None
    for kb in sizes_kb:
        n = _fp16_numel(kb * 1024, args)
        if n <= 0:
            continue
        x = torch.randn(n, device="cuda", dtype=torch.float16)
        groups = n // args.grad_block
        calls = {
            ("qwz", "quantize", "ds-kernels"): functools.partial(op.quantize, x, 8,
                                                                 args.weight_block),
            ("qgz", "quantize", "ds-kernels"): functools.partial(op.quantize, x, 4,
                                                                 args.grad_block),
        }  # fmt: skip
        if ds_mod is not None:
            calls[("qwz", "quantize", "deepspeed")] = functools.partial(
                ds_cuda_quantizer.quantize, x
            )
            calls[("qgz", "quantize", "deepspeed")] = functools.partial(
                ds_mod.swizzle_quant, x, groups, 4, sym, 1, args.nodes, args.devices_per_node
            )
        per_call: dict[tuple[str, str, str], float] = {}
        for (what, kind, system), fn in calls.items():
            per_call[(what, kind, system)] = us = _wall_us_per_call(fn)
            runs.append({"system": f"{system}-{what}-{kind}-fp16-small", "size_kb": kb,
                         "call_us": round(us, 2), "time_ms": round(us / 1000, 5),
                         "peak_mem_gb": None})  # fmt: skip
            print(f"{system} {what} {kind} {kb} KB: {us:.1f} us a call")
        for what in ("qwz", "qgz"):
            theirs = per_call.get((what, "quantize", "deepspeed"))
            if theirs is not None:
                mine = per_call[(what, "quantize", "ds-kernels")]
                ratios[f"deepspeed/ours call_us {what}-quantize {kb}KB"] = round(theirs / mine, 3)


def _wall_us_per_call(fn, calls: int = 200, repeats: int = 5) -> float:
    """Median over ``repeats`` of the wall time of ``calls`` calls queued back to back then
    waited for, per call: the host's time or the GPU's, whichever is longer."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e6 / calls)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("quant_bench needs a CUDA GPU (--dry-run runs its steps on the CPU)")
    device = "cpu" if args.dry_run else "cuda"

    # Step 1: DeepSpeed's op, built before anything is timed, under its own limit.
    build = None
    if not args.no_deepspeed:
        build = build_deepspeed_op(args.ds_build_timeout_s)
        print(f"deepspeed build: ok={build.ok} in {build.seconds} s (limit {build.limit_s:.0f} s,"
              f" TORCH_CUDA_ARCH_LIST={build.torch_cuda_arch_list}, MAX_JOBS={build.max_jobs})"
              + (f": {build.error}" if build.error else ""))  # fmt: skip
        if build.log_tail:
            print(build.log_tail)
        if args.build_only:
            return 0 if build.ok else 1
    elif args.build_only:
        sys.exit("--build-only and --no-deepspeed contradict each other")

    # Step 2: load it (the cached build) in this process.
    ds_mod = ds_cuda_quantizer = None
    ds_error = None if build is None else build.error
    load_s = None
    if build is not None and build.ok:
        t0 = time.perf_counter()
        ds_mod, ds_cuda_quantizer, ds_error = _load_deepspeed()
        load_s = round(time.perf_counter() - t0, 2)
        if ds_mod is not None and device != "cuda":
            ds_mod = ds_cuda_quantizer = None
            ds_error = "DeepSpeed's quantizer kernels run on CUDA tensors only (--dry-run)"

    # Step 3: time.
    time_ms = _Timer(device)
    op = ds_kernels.load("quantizer")
    device_name = (
        f"1 x {torch.cuda.get_device_name()}"
        if device == "cuda"
        else f"1 x cpu ({platform.machine()}, {os.cpu_count()} cores, --dry-run)"
    )

    def peak() -> float | None:
        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None

    sym = ds_mod.Symmetric if ds_mod is not None else None
    runs: list[dict] = []
    ratios: dict[str, float] = {}
    if build is not None and not build.ok:
        runs.append({"system": "deepspeed-quantizer", "error": build.error,
                     "build_log_tail": build.log_tail, "peak_mem_gb": None})  # fmt: skip
    elif ds_error is not None:
        runs.append({"system": "deepspeed-quantizer", "error": ds_error, "peak_mem_gb": None})

    def record_error(system: str, size_mb: int, error: str, **extra):
        runs.append({"system": system, "size_mb": size_mb, "error": error, "peak_mem_gb": None,
                     **extra})  # fmt: skip
        print(f"{system} {size_mb} MB: {error}")

    def record(system: str, size_mb: int, ms: float, moved: int, copy_gbps: float, **extra):
        gbps = moved / ms / 1e6
        runs.append(
            {
                "system": system,
                "size_mb": size_mb,
                "time_ms": round(ms, 4),
                "gbps": round(gbps, 1),
                "pct_hbm": round(100 * gbps / copy_gbps, 1),
                "peak_mem_gb": peak(),
                **extra,
            }
        )
        return gbps

    for size_mb in args.sizes:
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        n = _fp16_numel(size_mb * 2**20, args)
        if n == 0:
            sys.exit(f"--sizes-mb {size_mb} is smaller than one swizzle layout; use a larger size")
        x16 = torch.randn(n, device=device, dtype=torch.float16)
        y = torch.empty_like(x16)
        copy_ms = time_ms(lambda x=x16, y=y: y.copy_(x), args.reps)
        copy_gbps = 2 * _nbytes(x16) / copy_ms / 1e6
        runs.append(
            {"system": "torch-copy", "size_mb": size_mb, "time_ms": round(copy_ms, 4),
             "gbps": round(copy_gbps, 1), "pct_hbm": 100.0, "peak_mem_gb": None}
        )  # fmt: skip
        xbf = x16.bfloat16()

        def measure(system: str, fn, moved: int, size_mb=size_mb, copy_gbps=copy_gbps, **extra):
            """Time ``fn`` on the GPU and its host side per call; record both. The run."""
            record(system, size_mb, time_ms(fn, args.reps), moved, copy_gbps,
                   host_us=round(time_ms.host_us(fn), 1), **extra)  # fmt: skip
            return runs[-1]

        def compare(what: str, kind: str, mine: dict, theirs: dict, size_mb=size_mb) -> None:
            # bandwidth ours over DeepSpeed's, host time DeepSpeed's over ours: above 1 favours us
            ratios[f"ours/deepspeed {what} {kind} gbps {size_mb}MB"] = round(
                mine["gbps"] / theirs["gbps"], 3
            )
            ratios[f"deepspeed/ours host_us {what}-{kind} {size_mb}MB"] = round(
                theirs["host_us"] / mine["host_us"], 3
            )

        ours: dict[str, dict] = {}  # our runs by op, for the ratios
        for dtype_name, x in (("fp16", x16), ("bf16", xbf)):
            for bits, block, what in ((8, args.weight_block, "qwz"), (4, args.grad_block, "qgz")):
                codes, scales = op.quantize(x, bits, block)
                moved = _nbytes(x, codes, scales)
                key = f"{what}-quantize-{dtype_name}"
                ours[key] = measure(f"ds-kernels-{key}", functools.partial(op.quantize, x, bits,
                                    block), moved, bits=bits, block=block)  # fmt: skip
                if device == "cuda" and op.backend.value == "triton":
                    ours[key].update(_host_breakdown(op, x, codes, scales, bits, block,
                                                     time_ms.host_us))  # fmt: skip
                key = f"{what}-dequantize-{dtype_name}"
                ours[key] = measure(f"ds-kernels-{key}", functools.partial(op.dequantize, codes,
                                    scales, bits, block, n, x.dtype), moved, bits=bits,
                                    block=block)  # fmt: skip
        if args.sweep and (device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
            # (on the CPU, --dry-run under Triton's interpreter: a few tiles, to run the code)
            xs = x16 if device == "cuda" else x16[: 5 * args.weight_block + 100]
            try:
                _sweep_quant(xs, args.weight_block, args.grad_block, args.reps, time_ms, record,
                             record_error, size_mb, copy_gbps)  # fmt: skip
            except Exception:  # noqa: BLE001 - recorded; DeepSpeed's runs still follow
                record_error("sweep", size_mb, traceback.format_exc(limit=3))
        if ds_mod is None:
            continue
        # qwZ: exactly what ZeRO-3 calls (adaptive groups)
        try:
            q, s = ds_cuda_quantizer.quantize(x16)
            moved = _nbytes(x16, q, s)
            peer = measure("deepspeed-qwz-quantize-fp16", functools.partial(
                ds_cuda_quantizer.quantize, x16), moved, groups=s.numel())  # fmt: skip
            compare("qwz", "quantize", ours["qwz-quantize-fp16"], peer)
            peer = measure("deepspeed-qwz-dequantize-fp16", functools.partial(
                ds_cuda_quantizer.dequantize, q, s), moved, groups=s.numel())  # fmt: skip
            compare("qwz", "dequantize", ours["qwz-dequantize-fp16"], peer)
        except Exception:  # noqa: BLE001
            runs.append({"system": "deepspeed-qwz", "size_mb": size_mb,
                         "error": traceback.format_exc(limit=2), "peak_mem_gb": None})  # fmt: skip
        # qgZ: the swizzled int4 quantization of all_to_all_quant_reduce, same group size
        try:
            groups = n // args.grad_block
            q, s = ds_mod.swizzle_quant(x16, groups, 4, sym, 1, args.nodes, args.devices_per_node)
            moved = _nbytes(x16, q, s)
            peer = measure("deepspeed-qgz-swizzle-quantize-fp16", functools.partial(
                ds_mod.swizzle_quant, x16, groups, 4, sym, 1, args.nodes, args.devices_per_node),
                moved, groups=groups)  # fmt: skip
            compare("qgz", "quantize", ours["qgz-quantize-fp16"], peer)
            peer = measure("deepspeed-qgz-dequantize-fp16", functools.partial(
                ds_mod.dequantize, q, s, s.numel(), 4, sym), moved, groups=groups)  # fmt: skip
            compare("qgz", "dequantize", ours["qgz-dequantize-fp16"], peer)
        except Exception:  # noqa: BLE001
            runs.append({"system": "deepspeed-qgz", "size_mb": size_mb,
                         "error": traceback.format_exc(limit=2), "peak_mem_gb": None})  # fmt: skip

    if device == "cuda" and args.small_sizes_kb:
        _small_buckets(op, ds_mod, ds_cuda_quantizer, args.small_sizes_kb, args, runs, ratios)

    ours_pct = [r["pct_hbm"] for r in runs if r["system"].startswith("ds-kernels")
                and "pct_hbm" in r]  # fmt: skip
    worst = min(ours_pct) if ours_pct else None
    if worst is not None and math.isfinite(worst):
        ratios["ours worst pct_hbm / 70% goal"] = round(worst / GOAL_PCT_HBM, 3)
    ds_ratios = [v for k, v in ratios.items() if k.startswith("ours/deepspeed")]
    out = args.out
    if out is None and args.dry_run:
        out = tempfile.mkdtemp(prefix="quant_bench_dry_run_")
    path = write_results(
        scenario="zero-quant-kernels",
        device=device_name,
        runs=runs,
        ratios=ratios,
        path=out,
        metric="time_ms",
        config={
            "op_backend": op.backend.value,
            "sizes_mb": args.sizes_mb,
            "reps": args.reps,
            "weight_block": args.weight_block,
            "grad_block": args.grad_block,
            "swizzle": {"nodes": args.nodes, "devices_per_node": args.devices_per_node},
            "goal_pct_hbm": GOAL_PCT_HBM,
            "min_pct_hbm_ours": worst,
            "goal_pct_hbm_met": None if worst is None else worst >= GOAL_PCT_HBM,
            "faster_than_deepspeed_everywhere": (min(ds_ratios) > 1) if ds_ratios else None,
            "host_bound_measurements": time_ms.host_bound,
            "deepspeed_build": None if build is None else asdict(build),
            "deepspeed_load_s": load_s,
            "deepspeed_error": ds_error,
            "torch": torch.__version__,
            "triton": _triton_version(),
        },
    )
    for r in runs:
        print({k: v for k, v in r.items() if k != "build_log_tail"})
    print(ratios)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
