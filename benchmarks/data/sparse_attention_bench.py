"""Block-sparse attention (ds-data's SparseSelfAttention on FlexAttention) against dense flash
SDPA, forward + backward, one GPU.

    python benchmarks/data/sparse_attention_bench.py                 # 16K and 32K, ~2 min
    python benchmarks/data/sparse_attention_bench.py --lengths 16384 --iters 5

Shapes: batch 1, 16 heads of 64, bf16, bidirectional (the layouts' default). Systems:

* ``sdpa-dense-<L>``: ``F.scaled_dot_product_attention`` restricted to the flash backend.
* ``ours-bigbird-<L>``: ``BigBirdSparsityConfig(block=128, num_random_blocks=1,
  num_sliding_window_blocks=3, num_global_blocks=1)``.
* ``ours-fixed-<L>``: ``FixedSparsityConfig(block=128, num_local_blocks=16,
  num_global_blocks=1)`` (2048-token local windows, about sqrt of the block count, the Sparse
  Transformer's choice of stride).

``step_s`` is the median over ``--iters`` timed forward + backward passes (CUDA events, after
warm-up, which includes FlexAttention's compilation); ``density`` is the fraction of layout
blocks attended. Ratios: dense step_s / ours step_s (above 1: ours faster); the goal is >= 3.
Results: scenario ``sparse-attention`` in benchmarks/results/ (and $OUT).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "packages" / "ds-data" / "src"))
from _results import write_results  # noqa: E402
from _timing import cuda_median_s  # noqa: E402

from ds_data.sparse_attention import (  # noqa: E402
    BigBirdSparsityConfig,
    FixedSparsityConfig,
    SparseSelfAttention,
)

HEADS, HEAD_DIM = 16, 64


def _layouts(block: int):
    return {
        "bigbird": lambda: BigBirdSparsityConfig(
            HEADS,
            block,
            num_random_blocks=1,
            num_sliding_window_blocks=3,
            num_global_blocks=1,
            rng=random.Random(0),
        ),  # fmt: skip
        "fixed": lambda: FixedSparsityConfig(
            HEADS, block, num_local_blocks=max(1, 2048 // block), num_global_blocks=1
        ),  # fmt: skip
    }


def _inputs(length: int):
    g = torch.Generator(device="cuda").manual_seed(length)
    shape = (1, HEADS, length, HEAD_DIM)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))  # fmt: skip
    grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g)
    return q, k, v, grad


def _step(attend, q, k, v, grad):
    def run():
        q.grad = k.grad = v.grad = None
        attend(q, k, v).backward(grad)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    ap.add_argument("--layouts", nargs="+", default=["bigbird", "fixed"])
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--device-name", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("sparse_attention_bench needs a CUDA GPU")
    device = args.device_name or f"1x{torch.cuda.get_device_name()}"
    runs, ratios = [], {}
    for length in args.lengths:
        tag = f"{length // 1024}k"
        q, k, v, grad = _inputs(length)

        def dense(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v)

        torch.cuda.reset_peak_memory_stats()
        dense_s = cuda_median_s(_step(dense, q, k, v, grad), args.warmup, args.iters)
        runs.append({"system": f"sdpa-dense-{tag}", "step_s": dense_s, "seq_len": length,
                     "density": 1.0, "tokens_per_s": length / dense_s,
                     "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30})  # fmt: skip
        print(f"dense {tag}: {dense_s * 1e3:.2f} ms", flush=True)
        for name in args.layouts:
            module = SparseSelfAttention(_layouts(args.block)[name](), max_seq_length=length).cuda()
            density = float(module.get_layout(length).float().mean())
            torch.cuda.reset_peak_memory_stats()
            step_s = cuda_median_s(_step(module, q, k, v, grad), args.warmup, args.iters)
            system = f"ours-{name}-{tag}"
            runs.append({"system": system, "step_s": step_s, "seq_len": length, "density": density,
                         "block": args.block, "tokens_per_s": length / step_s,
                         "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30})  # fmt: skip
            ratios[f"{system}/sdpa-dense-{tag} speedup"] = dense_s / step_s
            print(f"{system}: {step_s * 1e3:.2f} ms, density {density:.3f}, "
                  f"{dense_s / step_s:.2f}x dense", flush=True)  # fmt: skip
        del q, k, v, grad
    path = write_results(
        scenario="sparse-attention", device=device, runs=runs, ratios=ratios,
        config={"batch": 1, "heads": HEADS, "head_dim": HEAD_DIM, "dtype": "bfloat16",
                "attention": "bidirectional", "block": args.block, "warmup": args.warmup,
                "iters": args.iters, "torch": torch.__version__,
                "metric_note": "step_s: forward + backward, median"},
        goal="ours >= 3x faster than dense flash SDPA at 16K and 32K",
    )  # fmt: skip
    print("wrote", path)


if __name__ == "__main__":
    main()
