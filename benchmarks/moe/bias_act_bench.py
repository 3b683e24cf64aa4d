"""The experts' first-layer bias + activation alone: ds-moe's fused kernel against the unfused passes.

    python benchmarks/moe/bias_act_bench.py                 # GPU, moe_bench's top-1/top-2 shapes

Both sides start from the grouped GEMM's output ``y`` [rows, ffn] (rows grouped by expert, as
the top-k layer's buffer: 1 + tokens * k rows, 8 equal groups) and run the kernels of forward +
backward from a fixed upstream gradient, without autograd: unfused = the one-hot GEMM bias add in
place, the activation, its backward and the grouped per-expert sum of the bias gradient (ds-moe
<= 0.1.5, and 0.1.6 by default); fused = ``ds_moe::bias_act`` and
``ds_moe::bias_act_backward``.
Reports the median of CUDA-event timings per side, the bytes each side moves over [rows, ffn]
(bf16: unfused 2R+2W forward, 3R+1W backward; fused 1R+1W and 2R+1W) and the bandwidth that
implies, and whether the two agree (max abs difference of h, dz, db). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parents[2]
# this checkout's packages; not ds-deepspeed's (a `deepspeed` alias)
sys.path[:0] = [
    str(p) for p in sorted((ROOT / "packages").glob("*/src")) if p.parent.name != "ds-deepspeed"
]

sys.path.insert(0, str(ROOT / "benchmarks"))  # the shared timer
from _timing import cuda_median_s  # noqa: E402

from ds_moe import _bias_act  # noqa: E402
from ds_moe._grouped_gemm import _grouped_mm_fn, group_onehot  # noqa: E402


def _act_backward(act, dh, z, h):
    """The backward kernel autograd runs for ``act`` (saved input or output as torch saves)."""
    if isinstance(act, nn.GELU):
        return torch.ops.aten.gelu_backward(dh, z, approximate=act.approximate)
    if isinstance(act, nn.SiLU):
        return torch.ops.aten.silu_backward(dh, z)
    return torch.ops.aten.threshold_backward(dh, h, 0)


def unfused_step(z, dh, bias, offs, onehot, act):
    """The unfused kernels, as ds-moe <= 0.1.5 runs them (``_GroupBias``, then ``act``).

    ``z`` holds the GEMM's output and takes the bias in place (so it drifts by one bias per
    call: the time is the same; the values are compared on a fresh copy)."""
    z.addmm_(onehot, bias)
    h = act(z)
    dz = _act_backward(act, dh, z, h)
    ones = dz.new_ones(dz.shape[0], 8).t()
    db = _grouped_mm_fn()(ones, dz, offs=offs)[:, 0].contiguous()
    return h, dz, db


def fused_step(y, dh, bias, offs, code):
    h = torch.ops.ds_moe.bias_act(y, bias, offs, code)
    dz, db = torch.ops.ds_moe.bias_act_backward(dh, y, bias, offs, code)
    return h, dz, db


def time_ms(fn, iters, warmup=3):
    return cuda_median_s(fn, warmup, iters) * 1e3


def measure(args, k, act, code, dtype, device) -> dict:
    rows = 1 + args.tokens * k
    sizes = [rows // args.experts + (i < rows % args.experts) for i in range(args.experts)]
    offs = torch.tensor(sizes, device=device).cumsum(0).to(torch.int32)
    g = torch.Generator(device=device).manual_seed(k)
    y = torch.randn(rows, args.ffn, device=device, generator=g).to(dtype)
    bias = (torch.randn(args.experts, args.ffn, device=device, generator=g) * 0.1).to(dtype)
    dh = torch.randn(rows, args.ffn, device=device, generator=g).to(dtype)
    onehot = group_onehot(offs, rows, dtype)
    ref = unfused_step(y.clone(), dh, bias, offs, onehot, act)
    got = fused_step(y, dh, bias, offs, code)
    z = y.clone()
    t_un = time_ms(lambda: unfused_step(z, dh, bias, offs, onehot, act), args.iters)
    t_fu = time_ms(lambda: fused_step(y, dh, bias, offs, code), args.iters)
    mib = rows * args.ffn * y.element_size() / 2**20
    return {
        "rows": rows,
        "unfused_ms": round(t_un, 4),
        "fused_ms": round(t_fu, 4),
        "speedup": round(t_un / t_fu, 3),
        "unfused_mib": round(mib * 8, 1),  # fwd 2R+2W, bwd 3R+1W
        "fused_mib": round(mib * 5, 1),  # fwd 1R+1W, bwd 2R+1W
        "unfused_tb_per_s": round(mib * 8 * 2**20 / (t_un / 1e3) / 1e12, 3),
        "fused_tb_per_s": round(mib * 5 * 2**20 / (t_fu / 1e3) / 1e12, 3),
        "max_abs_diff": {
            name: (a.float() - b.float()).abs().max().item()
            for name, a, b in zip(("h", "dz", "db"), got, ref)
        },
        "h_bits_differ": (got[0] != ref[0]).float().mean().item(),
        "dz_bits_differ": (got[1] != ref[1]).float().mean().item(),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--k", type=int, nargs="+", default=[1, 2])
    p.add_argument("--ffn", type=int, default=8192)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--act", choices=["gelu", "gelu_tanh", "relu", "silu"], default="gelu")
    args = p.parse_args(argv)
    acts = {"gelu": nn.GELU(), "gelu_tanh": nn.GELU("tanh"), "relu": nn.ReLU(), "silu": nn.SiLU()}
    act = acts[args.act]
    code = _bias_act.activation_code(act)
    dtype, device = torch.bfloat16, torch.device("cuda")
    result = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "fused_available": _bias_act.fused_bias_act_available(device, dtype, code),
        "config": vars(args),
    }
    for k in args.k:
        result[f"k{k}"] = measure(args, k, act, code, dtype, device)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
