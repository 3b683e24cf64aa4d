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
fraction of what this GPU's memory actually delivers. Times: CUDA events, median of `--reps`.

    TORCH_CUDA_ARCH_LIST=9.0 python benchmarks/zero/quant_bench.py [--sizes-mb 64,256,1024,2048]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _results import write_results  # noqa: E402

import ds_kernels  # noqa: E402


def _time_ms(fn: Callable[[], object], reps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _deepspeed():
    """DeepSpeed's quantizer module (JIT-built) and qwZ's CUDAQuantizer, or the reason why not."""
    try:
        from deepspeed.ops.op_builder import QuantizerBuilder
        from deepspeed.runtime.zero.partition_parameters import CUDAQuantizer

        module = QuantizerBuilder().load()
        return module, CUDAQuantizer(), None
    except Exception as exc:  # noqa: BLE001 - reported in the results
        return None, None, f"{type(exc).__name__}: {exc}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes-mb", default="64,256,1024,2048")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--grad-block", type=int, default=256)
    ap.add_argument("--weight-block", type=int, default=4096)
    ap.add_argument("--nodes", type=int, default=2, help="swizzle layout: nodes")
    ap.add_argument("--devices-per-node", type=int, default=8, help="swizzle layout")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("quant_bench needs a CUDA GPU")
    op = ds_kernels.load("quantizer")
    device = torch.cuda.get_device_name()
    ds_mod, ds_cuda_quantizer, ds_error = _deepspeed()
    sym = ds_mod.Symmetric if ds_mod is not None else None
    runs: list[dict] = []
    ratios: dict[str, float] = {}

    def record(system: str, size_mb: int, ms: float, moved: int, copy_gbps: float, **extra):
        gbps = moved / ms / 1e6
        runs.append(
            {
                "system": system,
                "size_mb": size_mb,
                "time_ms": round(ms, 4),
                "gbps": round(gbps, 1),
                "pct_hbm": round(100 * gbps / copy_gbps, 1),
                "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                **extra,
            }
        )
        return gbps

    for size_mb in (int(s) for s in args.sizes_mb.split(",")):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        n = size_mb * 2**20 // 2
        n -= n % (args.devices_per_node * args.nodes * max(args.grad_block, 16) * 8)
        x16 = torch.randn(n, device="cuda", dtype=torch.float16)
        y = torch.empty_like(x16)
        copy_ms = _time_ms(lambda x=x16, y=y: y.copy_(x), args.reps)
        copy_gbps = 2 * _nbytes(x16) / copy_ms / 1e6
        runs.append(
            {"system": "torch-copy", "size_mb": size_mb, "time_ms": round(copy_ms, 4),
             "gbps": round(copy_gbps, 1), "pct_hbm": 100.0, "peak_mem_gb": None}
        )  # fmt: skip
        xbf = x16.bfloat16()
        ours: dict[str, float] = {}
        for dtype_name, x in (("fp16", x16), ("bf16", xbf)):
            for bits, block, what in ((8, args.weight_block, "qwz"), (4, args.grad_block, "qgz")):
                codes, scales = op.quantize(x, bits, block)
                ms = _time_ms(lambda x=x, b=bits, k=block: op.quantize(x, b, k), args.reps)
                key = f"{what}-quantize-{dtype_name}"
                ours[key] = record(
                    f"ds-kernels-{key}", size_mb, ms, _nbytes(x, codes, scales), copy_gbps,
                    bits=bits, block=block,
                )  # fmt: skip
                ms = _time_ms(
                    lambda c=codes, s=scales, b=bits, k=block, t=x.dtype, m=n: op.dequantize(
                        c, s, b, k, m, t
                    ),
                    args.reps,
                )
                key = f"{what}-dequantize-{dtype_name}"
                ours[key] = record(
                    f"ds-kernels-{key}", size_mb, ms, _nbytes(x, codes, scales), copy_gbps,
                    bits=bits, block=block,
                )  # fmt: skip
        if ds_mod is None:
            runs.append({"system": "deepspeed", "size_mb": size_mb, "skipped": ds_error,
                         "peak_mem_gb": None})  # fmt: skip
            continue
        # qwZ: exactly what ZeRO-3 calls (adaptive groups)
        try:
            q, s = ds_cuda_quantizer.quantize(x16)
            ms = _time_ms(lambda x=x16: ds_cuda_quantizer.quantize(x), args.reps)
            ds_q = record("deepspeed-qwz-quantize-fp16", size_mb, ms, _nbytes(x16, q, s),
                          copy_gbps, groups=s.numel())  # fmt: skip
            ms = _time_ms(lambda q=q, s=s: ds_cuda_quantizer.dequantize(q, s), args.reps)
            ds_d = record("deepspeed-qwz-dequantize-fp16", size_mb, ms, _nbytes(x16, q, s),
                          copy_gbps, groups=s.numel())  # fmt: skip
            ratios[f"ours/deepspeed qwz quantize gbps {size_mb}MB"] = round(
                ours["qwz-quantize-fp16"] / ds_q, 3
            )
            ratios[f"ours/deepspeed qwz dequantize gbps {size_mb}MB"] = round(
                ours["qwz-dequantize-fp16"] / ds_d, 3
            )
        except Exception:  # noqa: BLE001
            runs.append({"system": "deepspeed-qwz", "size_mb": size_mb,
                         "error": traceback.format_exc(limit=2), "peak_mem_gb": None})  # fmt: skip
        # qgZ: the swizzled int4 quantization of all_to_all_quant_reduce, same group size
        try:
            groups = n // args.grad_block
            q, s = ds_mod.swizzle_quant(x16, groups, 4, sym, 1, args.nodes, args.devices_per_node)
            ms = _time_ms(
                lambda x=x16, g=groups: ds_mod.swizzle_quant(
                    x, g, 4, sym, 1, args.nodes, args.devices_per_node
                ),
                args.reps,
            )
            ds_q = record("deepspeed-qgz-swizzle-quantize-fp16", size_mb, ms,
                          _nbytes(x16, q, s), copy_gbps, groups=groups)  # fmt: skip
            ms = _time_ms(
                lambda q=q, s=s: ds_mod.dequantize(q, s, s.numel(), 4, sym),
                args.reps,
            )
            ds_d = record("deepspeed-qgz-dequantize-fp16", size_mb, ms, _nbytes(x16, q, s),
                          copy_gbps, groups=groups)  # fmt: skip
            ratios[f"ours/deepspeed qgz quantize gbps {size_mb}MB"] = round(
                ours["qgz-quantize-fp16"] / ds_q, 3
            )
            ratios[f"ours/deepspeed qgz dequantize gbps {size_mb}MB"] = round(
                ours["qgz-dequantize-fp16"] / ds_d, 3
            )
        except Exception:  # noqa: BLE001
            runs.append({"system": "deepspeed-qgz", "size_mb": size_mb,
                         "error": traceback.format_exc(limit=2), "peak_mem_gb": None})  # fmt: skip
    worst = min(
        (r["pct_hbm"] for r in runs if r["system"].startswith("ds-kernels")), default=math.nan
    )
    path = write_results(
        scenario="zero-quant-kernels",
        device=f"1 x {device}",
        runs=runs,
        ratios=ratios,
        metric="time_ms",
        config={
            "op_backend": op.backend.value,
            "sizes_mb": args.sizes_mb,
            "weight_block": args.weight_block,
            "grad_block": args.grad_block,
            "min_pct_hbm_ours": worst,
            "deepspeed_error": ds_error,
        },  # fmt: skip
    )
    for r in runs:
        print(r)
    print(ratios)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
