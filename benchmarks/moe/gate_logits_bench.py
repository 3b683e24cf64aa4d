"""The MoE router's fp32 logits alone: ds-moe's fused kernels against ``F.linear`` on fp32 copies.

    python benchmarks/moe/gate_logits_bench.py          # GPU, moe_bench's shape (16K x 2048, 8)

Both sides compute the router's logits from bf16 tokens ``x`` [tokens, hidden] and a bf16 gate
weight [experts, hidden], forward and backward from a fixed fp32 upstream gradient, through
autograd as the router runs them: unfused = ``F.linear(x.float(), w.float())`` (ds-moe's
default, and DeepSpeed's router), fused = ``ds_moe::gate_logits`` and its backward. Reports
the median of CUDA-event timings per side, the bytes each side moves over [tokens, hidden] (bf16
tokens 2 bytes, fp32 copies 4: unfused 24 bytes per element forward and backward, fused 6) and the bandwidth that implies, and how far the two sides' results differ. ``--sweep`` also
times each of the three kernels alone at other block sizes (runs ``kernel-<name>-...``, with the
bandwidth over its own bytes: logits read the tokens, the input gradient writes them, the weight
gradient reads them). Writes a results file (scenario ``moe-gate-logits``) and prints it.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
# this checkout's packages; not ds-deepspeed's (a `deepspeed` alias)
sys.path[:0] = [
    str(p) for p in sorted((ROOT / "packages").glob("*/src")) if p.parent.name != "ds-deepspeed"
]

sys.path.insert(0, str(ROOT / "benchmarks"))  # the shared timer and results writer
from _results import write_results  # noqa: E402
from _timing import cuda_median_s  # noqa: E402

from ds_moe import _gate_kernels, _gate_linear  # noqa: E402

#: (block_s, block_h) of the logits and input-gradient kernels, (block_s, block_h, rows) of the
#: weight-gradient kernel, timed by --sweep (the defaults are _gate_kernels' constants)
SWEEP_LOGITS = ((16, 128), (32, 128), (64, 128), (128, 128), (64, 256), (128, 64))
SWEEP_INPUT_GRAD = ((32, 128), (64, 128), (128, 128), (64, 256), (128, 64))
SWEEP_WEIGHT_GRAD = ((64, 128, 512), (64, 128, 256), (32, 128, 128), (16, 128, 256), (64, 128, 1024), (32, 128, 256),
                     (64, 64, 512), (128, 128, 1024))  # fmt: skip

#: bytes per [tokens, hidden] element moved by each side, forward + backward. Unfused: the
#: widening reads 2 and writes 4, the GEMM reads 4; backward writes the fp32 input gradient
#: (4), narrowing reads it (4) and writes 2, the weight gradient reads the fp32 copy (4).
UNFUSED_BYTES = (2 + 4) + 4 + 4 + (4 + 2) + 4
#: fused: the forward reads the tokens, the backward writes dx and reads the tokens
FUSED_BYTES = 2 + 2 + 2


def step(fn, x, w, up):
    x.grad = w.grad = None
    out = fn(x, w)
    out.backward(up)
    return out, x.grad, w.grad


def inputs(args, device, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens [tokens, hidden] and gate weight [experts, hidden] in ``dtype``, and an fp32
    upstream gradient of the logits; the same every call (seeded)."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.tokens, args.hidden, device=device, generator=g).to(dtype)
    w = (torch.randn(args.experts, args.hidden, device=device, generator=g) * 0.02).to(dtype)
    return x, w, torch.randn(args.tokens, args.experts, device=device, generator=g)


def measure(args, device, dtype) -> list[dict]:
    x, w, up = inputs(args, device, dtype)
    x.requires_grad_()
    w.requires_grad_()
    runs = []
    results = {}
    elements = args.tokens * args.hidden
    for name, fn, per_elem in (
        ("torch-fp32-linear", _gate_linear.reference, UNFUSED_BYTES),
        ("ds-moe-gate-logits", _gate_linear.gate_logits, FUSED_BYTES),
    ):
        results[name] = [t.detach().clone() for t in step(fn, x, w, up)]
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        ms = cuda_median_s(lambda fn=fn: step(fn, x, w, up), 3, args.iters) * 1e3
        # what one forward + backward adds on top of the inputs (the fp32 copy, for F.linear)
        extra_gb = (torch.cuda.max_memory_allocated(device) - base) / 2**30
        runs.append({
            "system": name, "step_ms": round(ms, 4), "peak_mem_gb": round(extra_gb, 3),
            "bytes_moved_gb": round(elements * per_elem / 1e9, 3),
            "tb_per_s": round(elements * per_elem / (ms / 1e3) / 1e12, 3),
        })  # fmt: skip
    ref, got = results["torch-fp32-linear"], results["ds-moe-gate-logits"]
    runs[1]["max_abs_diff"] = {
        name: (a.float() - b.float()).abs().max().item()
        for name, a, b in zip(("logits", "dx", "dw"), got, ref)
    }
    runs[1]["same_top1"] = bool(torch.equal(got[0].argmax(-1), ref[0].argmax(-1)))
    return runs


def sweep(args, device, dtype) -> list[dict]:
    """Each kernel alone at the block sizes above; bandwidth over the bytes of the
    [tokens, hidden] tensor it reads or writes (2 per element)."""
    x, w, up = inputs(args, device, dtype)
    nbytes = x.numel() * x.element_size()
    cases = [
        (f"logits-s{s}-h{h}", lambda s=s, h=h: _gate_kernels.logits(x, w, s, h))
        for s, h in SWEEP_LOGITS
    ]
    cases += [
        (f"input-grad-s{s}-h{h}", lambda s=s, h=h: _gate_kernels.input_grad(up, w, dtype, s, h))
        for s, h in SWEEP_INPUT_GRAD
    ]
    cases += [
        (f"weight-grad-s{s}-h{h}-r{r}",
         lambda s=s, h=h, r=r: _gate_kernels.weight_grad(up, x, w.dtype, s, h, r))
        for s, h, r in SWEEP_WEIGHT_GRAD
    ]  # fmt: skip
    runs = []
    for name, fn in cases:
        ms = cuda_median_s(fn, 3, args.iters) * 1e3
        runs.append({
            "system": f"kernel-{name}", "step_ms": round(ms, 4), "peak_mem_gb": None,
            "tb_per_s": round(nbytes / (ms / 1e3) / 1e12, 3),
        })  # fmt: skip
    return runs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--sweep", action="store_true",
                   help="also time each kernel alone at other block sizes")  # fmt: skip
    p.add_argument("--out", help="results file or folder (default benchmarks/results/)")
    args = p.parse_args(argv)
    device, dtype = torch.device("cuda"), torch.bfloat16
    if not _gate_linear.fused_gate_available(device, dtype):
        raise SystemExit(
            "the fused router logits do not run here (they need CUDA, Triton and a passing "
            "probe: run ds-moe's GPU tests to see why)"
        )
    runs = measure(args, device, dtype)
    ratio = runs[0]["step_ms"] / runs[1]["step_ms"]
    if args.sweep:
        runs += sweep(args, device, dtype)
    path = write_results(
        scenario="moe-gate-logits",
        device=f"1 x {torch.cuda.get_device_name(device)}",
        runs=runs,
        ratios={"ds-moe-gate-logits/torch-fp32-linear speed": round(ratio, 3)},
        path=args.out,
        metric="step_ms",
        note_peak_mem_gb="memory one forward + backward allocates on top of its inputs",
        config=vars(args),
        torch=torch.__version__,
    )
    print(path.read_text())


if __name__ == "__main__":
    main()
