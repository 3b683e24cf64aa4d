"""The experts' first-layer bias + activation alone: ds-moe's fused kernel against the unfused passes.

    python benchmarks/moe/bias_act_bench.py                 # GPU, moe_bench's top-1/top-2 shapes

Both sides start from the grouped GEMM's output ``y`` [rows, ffn] (rows grouped by expert, as
the top-k layer's buffer: 1 + tokens * k rows, 8 equal groups) and run the kernels of forward +
backward from a fixed upstream gradient, without autograd: unfused = the one-hot GEMM bias add in
place, the activation, its backward and the grouped per-expert sum of the bias gradient (ds-moe
<= 0.1.5, and 0.1.6 by default); fused = ``ds_moe::bias_act`` and
``ds_moe::bias_act_backward``.
Reports the median of CUDA-event timings per side, for the step and for its forward and
backward alone, the bytes each side moves over [rows, ffn] (bf16: unfused 2R+2W forward, 3R+1W
backward; fused 1R+1W and 2R+1W) and the bandwidth that implies, and whether the two agree (max
abs difference of h, dz, db). ``--tiles 32x128x4,...`` also times the fused kernels at other
tiles (BLOCK_M x BLOCK_N x warps; the default is ``_bias_act_kernels.tile_shape``). Writes a
results file (scenario ``moe-bias-act``) to ``--out`` (default ``benchmarks/results/``) and
``$OUT``, and prints it.
"""

from __future__ import annotations

import argparse
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
from _results import write_results  # noqa: E402
from _timing import cuda_median_s  # noqa: E402

from ds_moe import _bias_act  # noqa: E402
from ds_moe import _bias_act_kernels as _kernels  # noqa: E402
from ds_moe._grouped_gemm import _grouped_mm_fn, group_onehot  # noqa: E402


def _act_backward(act, dh, z, h):
    """The backward kernel autograd runs for ``act`` (saved input or output as torch saves)."""
    if isinstance(act, nn.GELU):
        return torch.ops.aten.gelu_backward(dh, z, approximate=act.approximate)
    if isinstance(act, nn.SiLU):
        return torch.ops.aten.silu_backward(dh, z)
    return torch.ops.aten.threshold_backward(dh, h, 0)


def unfused_backward(act, dh, z, h, offs):
    """The unfused backward: the activation's, then the grouped per-expert bias sum."""
    dz = _act_backward(act, dh, z, h)
    ones = dz.new_ones(dz.shape[0], 8).t()
    return dz, _grouped_mm_fn()(ones, dz, offs=offs)[:, 0].contiguous()


def unfused_step(z, dh, bias, offs, onehot, act):
    """The unfused kernels, as ds-moe <= 0.1.5 runs them (``_GroupBias``, then ``act``).

    ``z`` holds the GEMM's output and takes the bias in place (so it drifts by one bias per
    call: the time is the same; the values are compared on a fresh copy)."""
    z.addmm_(onehot, bias)
    h = act(z)
    dz, db = unfused_backward(act, dh, z, h, offs)
    return h, dz, db


def fused_step(y, dh, bias, offs, code):
    h = torch.ops.ds_moe.bias_act(y, bias, offs, code)
    dz, db = torch.ops.ds_moe.bias_act_backward(dh, y, bias, offs, code)
    return h, dz, db


def time_ms(fn, iters, warmup=3):
    return cuda_median_s(fn, warmup, iters) * 1e3


def _tb_per_s(mib: float, ms: float) -> float:
    return round(mib * 2**20 / (ms / 1e3) / 1e12, 3)


def parse_tiles(text: str) -> list[tuple[int, int, int]]:
    """``"64x128x8,32x256x4"`` -> [(BLOCK_M, BLOCK_N, warps), ...] (powers of two)."""
    tiles = []
    for item in filter(None, text.split(",")):
        parts = item.split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) & (int(p) - 1) == 0 for p in parts):
            raise SystemExit(f"--tiles: {item!r} is not BLOCK_MxBLOCK_NxWARPS in powers of two")
        tiles.append(tuple(int(p) for p in parts))
    return tiles


def measure(args, k, act, code, dtype, device) -> tuple[list[dict], dict]:
    """Runs (the step, its forward and its backward, each side) and how far the sides differ."""
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
    h_unfused = act(z)  # ReLU's backward reads its output; the others ignore it
    mib = rows * args.ffn * y.element_size() / 2**20
    # bytes over [rows, ffn] (bf16): unfused forward 2R+2W, backward 3R+1W; fused 1R+1W, 2R+1W
    sides = {
        "unfused": (
            lambda: unfused_step(z, dh, bias, offs, onehot, act),
            lambda: act(z.addmm_(onehot, bias)),
            lambda: unfused_backward(act, dh, z, h_unfused, offs),
            (4, 4),
        ),
        "fused": (
            lambda: fused_step(y, dh, bias, offs, code),
            lambda: torch.ops.ds_moe.bias_act(y, bias, offs, code),
            lambda: torch.ops.ds_moe.bias_act_backward(dh, y, bias, offs, code),
            (2, 3),
        ),
    }
    for tile in args.tiles:
        sides["fused-" + "x".join(map(str, tile))] = (
            None,
            lambda t=tile: _kernels.forward(y, bias, offs, code, tile=t),
            lambda t=tile: _kernels.backward(dh, y, bias, offs, code, tile=t),
            (2, 3),
        )
    runs = []
    for name, (step, fwd, bwd, (f_units, b_units)) in sides.items():
        t_f, t_b = time_ms(fwd, args.iters), time_ms(bwd, args.iters)
        run = {"system": f"{name}-top{k}", "k": k, "rows": rows, "peak_mem_gb": None}
        # a tile variant has no step of its own: its step is its forward plus its backward
        t = time_ms(step, args.iters) if step is not None else t_f + t_b
        run |= {"step_ms": round(t, 4), "tb_per_s": _tb_per_s(mib * (f_units + b_units), t)}
        if step is None:
            run["step_is_fwd_plus_bwd"] = True
        run |= {
            "fwd_ms": round(t_f, 4),
            "fwd_tb_per_s": _tb_per_s(mib * f_units, t_f),
            "bwd_ms": round(t_b, 4),
            "bwd_tb_per_s": _tb_per_s(mib * b_units, t_b),
            "mib_moved": round(mib * (f_units + b_units), 1),
        }
        runs.append(run)
    agreement = {
        "max_abs_diff": {
            name: (a.float() - b.float()).abs().max().item()
            for name, a, b in zip(("h", "dz", "db"), got, ref)
        },
        "h_bits_differ": (got[0] != ref[0]).float().mean().item(),
        "dz_bits_differ": (got[1] != ref[1]).float().mean().item(),
    }
    return runs, agreement


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--k", type=int, nargs="+", default=[1, 2])
    p.add_argument("--ffn", type=int, default=8192)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--act", choices=["gelu", "gelu_tanh", "relu", "silu"], default="gelu")
    p.add_argument("--tiles", type=parse_tiles, default=[],
                   help="also time the fused kernels at these tiles, e.g. 32x128x4,64x256x8")  # fmt: skip
    p.add_argument("--out", help="results file or folder (default benchmarks/results/)")
    args = p.parse_args(argv)
    acts = {"gelu": nn.GELU(), "gelu_tanh": nn.GELU("tanh"), "relu": nn.ReLU(), "silu": nn.SiLU()}
    act = acts[args.act]
    code = _bias_act.activation_code(act)
    dtype, device = torch.bfloat16, torch.device("cuda")
    if not _bias_act.fused_bias_act_available(device, dtype, code):
        raise SystemExit(
            "the fused bias + activation does not run here (it needs CUDA, Triton and a "
            "passing probe: run ds-moe's GPU tests to see why)"
        )
    runs, ratios, agreement = [], {}, {}
    for k in args.k:
        r, agreement[f"k{k}"] = measure(args, k, act, code, dtype, device)
        runs += r
        by = {x["system"]: x for x in r}
        ratios[f"fused/unfused speed top{k}"] = round(
            by[f"unfused-top{k}"]["step_ms"] / by[f"fused-top{k}"]["step_ms"], 3
        )
    path = write_results(
        scenario="moe-bias-act",
        device=f"1 x {torch.cuda.get_device_name(device)}",
        runs=runs,
        ratios=ratios,
        path=args.out,
        metric="step_ms",
        note="fwd/bwd_tb_per_s: the bytes each side moves over [rows, ffn] per its time",
        agreement=agreement,
        config={**vars(args), "tiles": ["x".join(map(str, t)) for t in args.tiles]},
        torch=torch.__version__,
        default_tile="x".join(map(str, _kernels.tile_shape(args.ffn))),
    )
    print(path.read_text())


if __name__ == "__main__":
    main()
