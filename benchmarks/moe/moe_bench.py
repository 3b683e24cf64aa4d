"""MoE layer forward+backward throughput: ds-moe against DeepSpeed's MoE, same process, same data.

    torchrun --nproc_per_node 1 benchmarks/moe/moe_bench.py            # 1 GPU: ep=1
    torchrun --nproc_per_node N benchmarks/moe/moe_bench.py            # N GPUs: ep=N
    torchrun --nproc_per_node 2 benchmarks/moe/moe_bench.py --device cpu --hidden 64 --tokens 512 \
        --dtype fp32 --iters 2 --repeats 1                             # CPU smoke run (gloo)

Setup (defaults; the peer is DeepSpeed 0.19.8's MoE layer run by the peers' ds_moe_bench.py): hidden d=2048, each expert a
2-layer MLP d -> 4d -> d with GELU, 8 experts, expert parallelism over all ranks (ep = world),
16,384 tokens per rank, bf16, capacity factor 1.25, loss = mean(out^2) + l_aux, top-1 and top-2.
``--loss upstream-grad`` times the layer alone instead, as ``gemm_peak_tflops`` and
``grouped_gemm_tflops`` are timed: backward from a fixed bf16 gradient of ``out`` (and 1 for
l_aux), gradients set to None before each step (a training loop's ``zero_grad``). The loss's
fp32 passes over the [tokens, d] output and autograd's adds into gradients left from the
previous step (the same cost for every system, about 1.3 ms of a top-1 step on an H100 by
moe_phases.py's count) then stay out of the step. Its results carry ``-upstream-grad`` in the
file name.

Systems (scenario ``moe-layer``), timed in turns (ours, DeepSpeed, ours, ...; each turn
starting one system later than the one before) so clock and thermal drift hit all:
- ``ds-moe-top1``, ``ds-moe-top2``: grouped GEMM experts, capacity factor 1.25;
- ``ds-moe-dropless-top2``: the same layer with ``drop_tokens=False`` (variable-size groups);
- ``deepspeed-top1``, ``deepspeed-top2``: deepspeed.moe.layer.MoE, when deepspeed imports
  (else run the peer script in the same session and compare by hand);
- ``ds-moe-unfused-top1``/``-top2``: ``ds-moe-top<k>`` with the fused bias + activation
  kernel (ds-moe >= 0.1.6, the default from 0.1.9) switched off (dropped where that kernel
  does not run, e.g. without Triton or on the CPU, as both then run the same path): the A/B of
  that kernel in the same turns, ratio ``ds-moe-top<k>/ds-moe-unfused-top<k>`` (above 1: the
  fused kernel is faster);
- ``ds-moe-unfusedcombine-top1``/``-top2``: ``ds-moe-top<k>`` with the single-pass combine and
  permutation backward (ds-moe >= 0.1.10, on by default) switched off (dropped where those
  kernels do not run), ratio ``ds-moe-top<k>/ds-moe-unfusedcombine-top<k>``;
- ``ds-moe-unfusedroute-top1``/``-top2``: ``ds-moe-top<k>`` with the router's capacity and
  placement in torch ops instead of its three kernels (ds-moe >= 0.1.10, on by default),
  ratio ``ds-moe-top<k>/ds-moe-unfusedroute-top<k>``;
- ``ds-moe-fusedgate-top1``/``-top2``: ``ds-moe-top<k>`` with the opt-in fused router logits
  (ds-moe >= 0.1.7: fp32 logits read straight from the bf16 tokens, no fp32 copy; dropped
  where those kernels do not run), ratio ``ds-moe-fusedgate-top<k>/ds-moe-top<k>``;
- ``ds-moe-loop-top1``/``-top2`` on request (``--systems``): the grouped kernel switched off.

Each run has ``host_s_rank0`` on CUDA: the host's own time to issue one step while the GPU is
held busy (near ``step_s``, the step is bound by Python and launches, not by the GPU).
Each run has ``step_s`` (forward + backward) and ``expert_tflops``: the expert MLPs' nominal
FLOPs (6 * 2 * tokens * k * 2 * d * ffn, the same count for every system) per second. The
ds-moe systems are built from the same seed (the same router and expert weights: their A/Bs
route alike) and also report ``expert_rows`` and ``largest_group_rows`` for one routing. The
card's reachable bf16 rate is measured in the same run with plain dense GEMMs of the same
shapes (``gemm_peak_tflops``: the MLP's six GEMMs over tokens * k rows, forward and backward),
and every run reports ``expert_gemm_share_of_peak`` = expert_tflops / gemm_peak_tflops.
``grouped_gemm_tflops``: the same six GEMMs through the grouped kernel on equal groups, no
routing (what the layer's GEMMs could reach at best with these shapes).

On a GPU (or with ``--phases``) ``phases`` breaks ds-moe-top<k>'s step (and
ds-moe-fusedgate-top<k>'s, whose ``model_h100`` still counts the default router) down per
phase: kernel time measured with torch.profiler next to the op/byte model of
``moe_phases.py``, and the expert GEMMs' own rate against the plain GEMM's (is the gap in the
GEMMs or around them?).
``ds-moe-top<k>`` runs the default path: the fused bias + activation where its kernel runs,
which top-level ``fused_bias_act`` says (then the ``ds-moe-unfused-*`` systems time the other
path).

Rank 0 prints the JSON and writes it to benchmarks/results/moe-layer-<device>-<yyyymmdd>.json
and, when $OUT is set, to $OUT/ as well. Before timing, ``--check`` (on by default) verifies on
this device that the expert-parallel layer equals an ep=1 layer holding all experts.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parents[2]
# ds_moe and its siblings (ds_comm, ds_accel) from this checkout; harmless when on PYTHONPATH.
# Never ds-deepspeed's src: its ``deepspeed`` alias would stand in for the real DeepSpeed peer.
_OUR_DEEPSPEED = str(ROOT / "packages" / "ds-deepspeed" / "src")
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _OUR_DEEPSPEED]
for _src in sorted((ROOT / "packages").glob("*/src"), reverse=True):
    if str(_src) != _OUR_DEEPSPEED:
        sys.path.insert(0, str(_src))

import ds_moe  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks" / "moe"))  # moe_phases, when run from elsewhere
from moe_phases import model_on_meta, profile_phases  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))  # the shared results writer
from _results import write_results  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_SYSTEMS = (
    "ds-moe-top1",
    "ds-moe-top2",
    "ds-moe-dropless-top2",
    "ds-moe-unfused-top1",
    "ds-moe-unfused-top2",
    "ds-moe-unfusedcombine-top1",
    "ds-moe-unfusedcombine-top2",
    "ds-moe-unfusedroute-top1",
    "ds-moe-unfusedroute-top2",
    "ds-moe-fusedgate-top1",
    "ds-moe-fusedgate-top2",
    "deepspeed-top1",
    "deepspeed-top2",
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", dest="d", type=int, default=2048)
    p.add_argument("--ffn-mult", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--tokens", type=int, default=16384, help="tokens per rank")
    p.add_argument("--k", type=int, nargs="+", default=[1, 2])
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3, help="timed turns per implementation")
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS))
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--no-check", dest="check", action="store_false")
    p.add_argument(
        "--phases",
        dest="phases",
        action="store_true",
        default=None,
        help="profile ds-moe-top<k> (and ds-moe-fusedgate-top<k>) per phase (default: on a GPU)",
    )
    p.add_argument("--no-phases", dest="phases", action="store_false")
    p.add_argument("--out", default=None, help="extra output dir (default: $OUT if set)")
    p.add_argument("--loss", choices=["mean-square", "upstream-grad"], default="mean-square",
                   help="what the timed backward starts from: mean(out^2) + l_aux as the peer "
                   "does, or a fixed bf16 gradient of out (the layer's own cost)")  # fmt: skip
    return p.parse_args(argv)


def init(args):
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return torch.device("cuda", local) if use_cuda else torch.device("cpu")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def expert_module(args):
    return nn.Sequential(
        nn.Linear(args.d, args.ffn_mult * args.d),
        nn.GELU(),
        nn.Linear(args.ffn_mult * args.d, args.d),
    )


def fused_bias_act_available(device, dtype):
    """Whether ds-moe runs the experts' bias + GELU as one fused kernel here (0.1.6+)."""
    try:
        from ds_moe import _bias_act
    except ImportError:
        return False
    return _bias_act.fused_bias_act_available(device, dtype, _bias_act.GELU)


def fused_bias_act_requested(experts) -> bool:
    """Whether these experts ask for the fused bias + activation: their ``fuse_bias_act`` or,
    unset, the package's default (on from ds-moe 0.1.9, off before)."""
    try:
        from ds_moe import _bias_act
    except ImportError:
        return False
    return _bias_act.fused_bias_act_requested(getattr(experts, "fuse_bias_act", None))


def fused_combine_available(device, dtype):
    """Whether ds-moe's single-pass combine runs here (0.1.10+: CUDA, Triton, bf16/fp16)."""
    try:
        from ds_moe import _combine
    except ImportError:
        return False
    return _combine.fused_combine_available(device, dtype)


def fused_combine_used(layer, device, dtype) -> bool:
    """Whether this ds-moe layer runs the single-pass combine: asked for and available."""
    try:
        from ds_moe import _combine
    except ImportError:
        return False
    asked = _combine.fused_combine_requested(getattr(layer, "fuse_combine", None))
    return asked and _combine.fused_combine_available(device, dtype)


def fused_route_available(device):
    """Whether ds-moe places the router's assignments with its kernels here (0.1.10+)."""
    try:
        from ds_moe import _route_fused
    except ImportError:
        return False
    return _route_fused.fused_route_available(device)


def fused_route_used(layer, device) -> bool:
    """Whether this ds-moe layer's router places with its kernels: asked for and available."""
    try:
        from ds_moe import _route_fused
    except ImportError:
        return False
    asked = _route_fused.fused_route_requested(getattr(layer.gate, "fuse_route", None))
    return asked and _route_fused.fused_route_available(device)


def fused_gate_available(device, dtype):
    """Whether ds-moe computes the router's fp32 logits without an fp32 copy here (0.1.7+)."""
    try:
        from ds_moe import _gate_linear
    except ImportError:
        return False
    return _gate_linear.fused_gate_available(device, dtype)


def build_ours(args, k, device, dtype, *, grouped_kernel=True, fused=None, fused_gate=None,
               fused_combine=None, fused_route=None, ep=None, **kw):  # fmt: skip
    moe = ds_moe.MoE(args.d, expert_module(args), num_experts=args.experts,
                     ep_size=ep or dist.get_world_size(), k=k,
                     capacity_factor=args.capacity_factor, **kw)  # fmt: skip
    moe = moe.to(device=device, dtype=dtype).train()
    if not grouped_kernel:
        moe.experts.use_grouped_mm = False
    if fused is not None and hasattr(moe.experts, "fuse_bias_act"):
        moe.experts.fuse_bias_act = fused  # ds-moe 0.1.6+ (default on from 0.1.9)
    if fused_gate is not None and hasattr(moe.gate, "fuse_logits"):
        moe.gate.fuse_logits = fused_gate  # ds-moe 0.1.7+: opt-in fused router logits
    if fused_combine is not None and hasattr(moe, "fuse_combine"):
        moe.fuse_combine = fused_combine  # ds-moe 0.1.10+ (default on)
    if fused_route is not None and hasattr(moe.gate, "fuse_route"):
        moe.gate.fuse_route = fused_route  # ds-moe 0.1.10+ (default on)
    return moe


def expert_rows(layer, x) -> dict:
    """A ds-moe layer's rows through its experts for one routing of ``x`` (rank 0's): all
    of them (``expert_rows``) and the largest expert's (``largest_group_rows``); what
    capacity dropped and how skewed the groups are. Empty for DeepSpeed's layer."""
    gate = getattr(layer, "gate", None)
    if not hasattr(gate, "capacity_for"):
        return {}
    with torch.no_grad():
        counts = gate(x.detach().reshape(-1, x.shape[-1]), None).kept_counts
    return {"expert_rows": int(counts.sum()), "largest_group_rows": int(counts.max())}


def build_system(name, args, device, dtype):
    """(layer, k) for a system name:
    [ds-moe|ds-moe-dropless|ds-moe-unfused|ds-moe-unfusedcombine|ds-moe-unfusedroute|
    ds-moe-fusedgate|ds-moe-loop|deepspeed]-top<k>."""
    impl, _, top = name.rpartition("-top")
    if not top.isdigit():
        raise SystemExit(f"--systems: {name!r} does not end in -top<k>")
    k = int(top)
    if impl == "ds-moe":
        return build_ours(args, k, device, dtype), k
    if impl == "ds-moe-dropless":
        return build_ours(args, k, device, dtype, drop_tokens=False), k
    if impl == "ds-moe-unfused":
        return build_ours(args, k, device, dtype, fused=False), k
    if impl == "ds-moe-unfusedcombine":
        return build_ours(args, k, device, dtype, fused_combine=False), k
    if impl == "ds-moe-unfusedroute":
        return build_ours(args, k, device, dtype, fused_route=False), k
    if impl == "ds-moe-fusedgate":
        return build_ours(args, k, device, dtype, fused_gate=True), k
    if impl == "ds-moe-loop":
        return build_ours(args, k, device, dtype, grouped_kernel=False), k
    if impl == "deepspeed":
        return build_deepspeed(args, k, device, dtype), k
    raise SystemExit(f"--systems: unknown {name!r}; e.g. {', '.join(DEFAULT_SYSTEMS)}")


def _best_seconds(once, args, device, reset=None) -> float:
    """The fastest of ``iters`` timed calls of ``once`` after ``warmup`` (``reset`` runs before
    each, untimed)."""
    best = float("inf")
    for i in range(args.warmup + args.iters):
        if reset is not None:
            reset()
        sync(device)
        t0 = time.perf_counter()
        once()
        sync(device)
        if i >= args.warmup:
            best = min(best, time.perf_counter() - t0)
    return best


def gemm_peak_tflops(args, k, device, dtype):
    """TFLOP/s of plain dense GEMMs with the experts' shapes, forward and backward.

    tokens * k rows through d -> ffn -> d, as one matrix (no routing, no grouping): the six
    GEMMs an MLP's forward and backward run. This is the rate the expert GEMMs could reach
    on this card in this run, the denominator of ``expert_gemm_share_of_peak``.
    """
    rows, d, f = args.tokens * k, args.d, args.ffn_mult * args.d
    g = torch.Generator(device=device).manual_seed(7)
    x = torch.randn(rows, d, generator=g, device=device).to(dtype)
    w1 = torch.randn(d, f, generator=g, device=device).to(dtype)
    w2 = torch.randn(f, d, generator=g, device=device).to(dtype)
    dy = torch.randn(rows, d, generator=g, device=device).to(dtype)

    def once():
        h = x @ w1
        _ = h @ w2
        dh = dy @ w2.t()
        _ = h.t() @ dy
        _ = dh @ w1.t()
        _ = x.t() @ dh

    return 6 * 2 * rows * d * f / _best_seconds(once, args, device) / 1e12


def grouped_gemm_tflops(args, k, device, dtype):
    """TFLOP/s of the experts' grouped GEMMs alone: equal groups, no routing, fwd + bwd.

    ``tokens * k`` rows in ``experts`` equal groups through the same grouped kernel and
    weight layout as the layer (``w`` stored [E, out, in], passed transposed), forward and
    backward by autograd: the rate these shapes reach as grouped GEMMs, between the plain
    dense GEMM (``gemm_peak_tflops``) and the layer. None where the kernel is unavailable.
    """
    if not ds_moe.grouped_mm_available(device, dtype):
        return None
    fn = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    e, d, f = args.experts, args.d, args.ffn_mult * args.d
    rows = args.tokens * k
    g = torch.Generator(device=device).manual_seed(11)
    x = torch.randn(rows, d, generator=g, device=device).to(dtype).requires_grad_()
    w1 = (torch.randn(e, f, d, generator=g, device=device) * d**-0.5).to(dtype).requires_grad_()
    w2 = (torch.randn(e, d, f, generator=g, device=device) * f**-0.5).to(dtype).requires_grad_()
    dy = torch.randn(rows, d, generator=g, device=device).to(dtype)
    sizes = [rows // e + (1 if i < rows % e else 0) for i in range(e)]
    offs = torch.tensor(sizes, device=device).cumsum(0).to(torch.int32)

    def once():
        h = fn(x, w1.transpose(-2, -1), offs=offs)
        y = fn(h, w2.transpose(-2, -1), offs=offs)
        y.backward(dy)

    def reset():
        x.grad = w1.grad = w2.grad = None

    return 6 * 2 * rows * d * f / _best_seconds(once, args, device, reset) / 1e12


def build_deepspeed(args, k, device, dtype):
    from deepspeed.moe.layer import MoE as DSMoE

    moe = DSMoE(hidden_size=args.d, expert=expert_module(args), num_experts=args.experts,
                ep_size=dist.get_world_size(), k=k, capacity_factor=args.capacity_factor)  # fmt: skip
    moe.set_deepspeed_parallelism()  # what deepspeed.initialize does: its ep group
    return moe.to(device=device, dtype=dtype).train()


def upstream_grad(args, x, device):
    """The fixed output gradient of ``--loss upstream-grad`` (None for the mean-square loss):
    d mean(out^2) / d out at a unit-scale output, the same for every system."""
    if args.loss != "upstream-grad":
        return None
    gen = torch.Generator(device=device).manual_seed(7)
    return (torch.randn(x.shape, generator=gen, device=device) * (2.0 / x.numel())).to(x.dtype)


def one_step(layer, x, dy):
    """One forward + backward as the timing loop runs it."""
    if dy is not None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
    out, l_aux, _ = layer(x)
    if dy is None:
        (out.float().square().mean() + l_aux).backward()
    else:
        outs, grads = [out], [dy]
        if isinstance(l_aux, torch.Tensor) and l_aux.requires_grad:
            outs.append(l_aux)
            grads.append(torch.ones_like(l_aux))
        torch.autograd.backward(outs, grads)


def time_layer(layer, x, args, device):
    """Seconds per forward+backward, averaged over ``iters`` after ``warmup`` (as the peer does)."""
    dy = upstream_grad(args, x, device)
    for i in range(args.warmup + args.iters):
        if i == args.warmup:
            sync(device)
            t0 = time.perf_counter()
        one_step(layer, x, dy)
    sync(device)
    return (time.perf_counter() - t0) / args.iters


def host_seconds(layer, x, args, device, steps: int = 3) -> float | None:
    """The host's own time to issue one step (CUDA): the GPU is held busy by a sleep kernel
    first, so no launch waits for the device and the time is Python, dispatch and launches
    alone. A step whose host time nears its ``step_s`` leaves the GPU idle between kernels."""
    if device.type != "cuda":
        return None
    dy = upstream_grad(args, x, device)
    one_step(layer, x, dy)
    torch.cuda.synchronize(device)
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time: longer than the steps' host time
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step(layer, x, dy)
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize(device)
    return elapsed / steps


def seed_experts_by_global_id(moe, device):
    with torch.no_grad():
        for local, g in enumerate(moe.expert_ids):
            gen = torch.Generator(device=device).manual_seed(1234 + g)
            for p in (moe.experts.w1, moe.experts.b1, moe.experts.w2, moe.experts.b2):
                scale = p.shape[-1] ** -0.5 if p.dim() == 3 else 0.02
                p[local].copy_(torch.randn(p.shape[1:], generator=gen, device=device) * scale)


def check_parity(args, device, dtype):
    """ep=world layer vs an ep=1 layer holding all experts, same weights and tokens."""
    result = {}
    for k in args.k:
        # deterministic routing: no RTS, no Gumbel sampling of the second expert
        kw = dict(drop_tokens=False, use_rts=False, top2_2nd_expert_sampling=False)
        torch.manual_seed(0)
        ep = build_ours(args, k, device, dtype, **kw)
        torch.manual_seed(0)
        ref = build_ours(args, k, device, dtype, ep=1, **kw)
        for m in (ep, ref):
            seed_experts_by_global_id(m, device)
        gen = torch.Generator(device=device).manual_seed(99 + dist.get_rank())
        x = torch.randn(min(args.tokens, 2048), args.d, generator=gen, device=device).to(dtype)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, _, counts = ep(xa)
        ref_out, _, ref_counts = ref(xb)
        out.float().square().mean().backward()
        ref_out.float().square().mean().backward()
        err = (out.float() - ref_out.float()).abs().max().item()
        gerr = (xa.grad.float() - xb.grad.float()).abs().max().item()
        scale = ref_out.float().abs().max().item()
        gscale = xb.grad.float().abs().max().item()
        ok = (
            torch.equal(counts, ref_counts)
            and err <= 2e-2 * scale + 1e-6
            and gerr <= 2e-2 * gscale + 1e-9
        )
        flag = torch.tensor([1.0 if ok else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        result[f"k{k}"] = {"ok": bool(flag.item()), "max_abs_err_out": err, "max_abs_out": scale,
                           "max_abs_err_dx": gerr, "max_abs_dx": gscale}  # fmt: skip
        del ep, ref
    return result


def build_k(name):
    return int(name.rpartition("-top")[2])


def check_against_deepspeed(args, device, dtype):
    """ds-moe vs DeepSpeed's MoE with the same weights and tokens where the semantics match.

    Dropless routing (``drop_tokens=False``; DeepSpeed pads every expert to the largest one,
    ds-moe runs exact groups), no RTS, and for top-2 no Gumbel sampling of the second expert
    (``top2_2nd_expert_sampling=False``): the chosen experts and weights then agree, so the
    outputs and the input and router gradients must too. The aux loss agrees for top-1 only
    (DeepSpeed's top2gating counts first choices only). With ep > 1 DeepSpeed's expert
    gradients are ep times ds-moe's (ds-moe averages them per rank), so those are compared at
    ep = 1 only.
    """
    from deepspeed.moe.layer import MoE as DSMoE

    world = dist.get_world_size()
    result = {}
    for k in (1, 2):
        torch.manual_seed(0)
        kw = {"top2_2nd_expert_sampling": False} if k == 2 else {}
        ds = DSMoE(hidden_size=args.d, expert=expert_module(args), num_experts=args.experts,
                   ep_size=world, k=k, capacity_factor=args.capacity_factor,
                   drop_tokens=False, use_rts=False, **kw).to(device=device, dtype=dtype).train()  # fmt: skip
        ds.set_deepspeed_parallelism()  # what deepspeed.initialize does: its ep group
        ours = build_ours(args, k, device, dtype, drop_tokens=False, use_rts=False, **kw)
        with torch.no_grad():
            ours.gate.wg.weight.copy_(ds.deepspeed_moe.gate.wg.weight)
            # distinct experts (both libraries start them as copies of one), the same on both
            seed_experts_by_global_id(ours, device)
            for i, e in enumerate(ds.deepspeed_moe.experts.deepspeed_experts):
                e[0].weight.copy_(ours.experts.w1[i])
                e[0].bias.copy_(ours.experts.b1[i])
                e[2].weight.copy_(ours.experts.w2[i])
                e[2].bias.copy_(ours.experts.b2[i])
            for i, e in enumerate(ds.deepspeed_moe.experts.deepspeed_experts):
                ours.experts.w1[i].copy_(e[0].weight)
                ours.experts.b1[i].copy_(e[0].bias)
                ours.experts.w2[i].copy_(e[2].weight)
                ours.experts.b2[i].copy_(e[2].bias)
        gen = torch.Generator(device=device).manual_seed(7 + dist.get_rank())
        x = torch.randn(1, min(args.tokens, 2048), args.d, generator=gen, device=device).to(dtype)
        res = {}
        for name, layer in (("ours", ours), ("deepspeed", ds)):
            xi = x.clone().requires_grad_()
            out, l_aux, _ = layer(xi)
            # top-2 aux losses differ by definition (see above): its gradient is left out
            (out.float().square().mean() + (l_aux if k == 1 else 0.0)).backward()
            gate = ours.gate.wg if name == "ours" else ds.deepspeed_moe.gate.wg
            w1 = (
                ours.experts.w1.grad[0]
                if name == "ours"
                else ds.deepspeed_moe.experts.deepspeed_experts[0][0].weight.grad
            )
            res[name] = {"out": out, "dx": xi.grad, "dgate": gate.weight.grad, "dw1": w1,
                         "l_aux": l_aux.reshape(1)}  # fmt: skip
        compared = ["out", "dx", "dgate"] + (["dw1"] if world == 1 else [])
        compared += ["l_aux"] if k == 1 else []
        entry, ok = {}, True
        for key in compared:
            a, b = res["ours"][key].float(), res["deepspeed"][key].float()
            err, scale = (a - b).abs().max().item(), b.abs().max().item()
            tol = (2e-2 if dtype != torch.float32 else 1e-4) * scale + 1e-12
            entry[key] = {"max_abs_err": err, "max_abs": scale}
            ok = ok and err <= tol
        flag = torch.tensor([1.0 if ok else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        entry["ok"] = bool(flag.item())
        result[f"k{k}"] = entry
        del ds, ours
    return result


def phase_breakdown(args, k, layer, x, flops, peak_tflops, dtype):
    """Where one forward+backward of ``layer`` spends its time, per phase (moe_phases.py).

    ``measured``: torch.profiler kernel time per phase on this device, per step (rank 0's; the
    profiler slows the host, not the kernels), ``wall_ms`` and ``idle_ms`` (no kernel running).
    ``expert_gemm_tflops``: the expert GEMMs' FLOPs over their own kernel time, against the
    plain GEMM rate of the same shapes: below it, the grouped kernels themselves are slower;
    ``non_gemm_ms``: everything else the GPU ran (gating, layout, gathers, bias, activation,
    the benchmark's loss and the gradient accumulation of its never-zeroed loop; those two
    are also ``harness_ms``: timing-loop work that DeepSpeed's runs pay the same).
    ``model_h100``: launches, bytes and the bandwidth/launch estimate per phase at this shape
    (ep 1, bf16 only), from counting the ops on the ``meta`` device.
    """
    x.grad = None
    measured = profile_phases(layer, x, iters=3)
    gemm_ms = sum(v["ms"] for p, v in measured["phases"].items() if p.startswith("expert_gemm."))
    entry = {"measured": measured}
    # the timing loop's own work: its fp32 loss and the adds into never-zeroed gradients
    harness_ms = sum(
        v["ms"]
        for p, v in measured["phases"].items()
        if p.startswith(("loss.", "grad_accumulate."))
    )
    entry["harness_ms"] = round(harness_ms, 4)
    if gemm_ms > 0:
        entry["expert_gemm_ms"] = round(gemm_ms, 4)
        entry["non_gemm_ms"] = round(measured["busy_ms"] - gemm_ms, 4)
        # top-k's nominal FLOPs over the GEMMs' kernel time (dropped rows are not computed)
        entry["expert_gemm_tflops"] = round(flops / (gemm_ms / 1e3) / 1e12, 3)
        entry["expert_gemm_kernel_share_of_peak"] = round(
            entry["expert_gemm_tflops"] / peak_tflops, 3
        )
    if dist.get_world_size() == 1 and dtype == torch.bfloat16:  # the grouped kernel's dtype
        cap = args.capacity_factor
        # the path this layer ran: fused bias + GELU unless switched off, where its kernel runs
        fused = fused_bias_act_requested(layer.experts) and fused_bias_act_available(
            x.device, dtype
        )
        model = model_on_meta(args.d, args.ffn_mult * args.d, args.experts, k, cap, args.tokens,
                              dtype, fused_bias_act=fused,
                              fused_combine=fused_combine_used(layer, x.device, dtype),
                              fused_route=fused_route_used(layer, x.device))  # fmt: skip
        entry["model_h100"] = {
            "totals": model["totals"],
            "phases": {p: {key: v[key] for key in ("launches", "mib", "est_ms")}
                       for p, v in model["phases"].items()},
        }  # fmt: skip
    return entry


def _round_or_none(v, digits=5):
    return None if v is None else round(v, digits)


def device_slug(device):
    world = dist.get_world_size()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower().replace("nvidia", "").strip()
        return f"{world}x{name.replace(' ', '-')}"
    return f"{world}xcpu"


def main(argv=None):
    args = parse_args(argv)
    device = init(args)
    if args.phases is None:
        args.phases = device.type == "cuda"
    dtype = DTYPES[args.dtype]
    rank, world = dist.get_rank(), dist.get_world_size()
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    ds_version = None
    if args.check or any(s.startswith("deepspeed-") for s in systems):
        try:
            import deepspeed

            deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
            ds_version = deepspeed.__version__
        except Exception as exc:  # noqa: BLE001 - the peer is optional here
            if rank == 0:
                print(f"[moe_bench] deepspeed unavailable ({exc!r}); timing ds-moe only; run "
                      "shared/peers/ds_moe_bench.py in the same session to compare", flush=True)  # fmt: skip
            systems = [s for s in systems if not s.startswith("deepspeed-")]
    # without its kernels a switched system equals ds-moe-top<k>: nothing to compare
    for prefix, available, what in (
        ("ds-moe-unfused-", fused_bias_act_available, "fused bias + activation kernel"),
        ("ds-moe-unfusedcombine-", fused_combine_available, "single-pass combine (bf16/fp16)"),
        ("ds-moe-unfusedroute-", lambda dv, dt: fused_route_available(dv), "fused placement"),
        ("ds-moe-fusedgate-", fused_gate_available, "fused router logits (bf16/fp16)"),
    ):
        if not available(device, dtype) and any(s.startswith(prefix) for s in systems):
            if rank == 0:
                print(f"[moe_bench] no {what} here (needs CUDA and Triton); skipping the "
                      f"{prefix}* systems", flush=True)  # fmt: skip
            systems = [s for s in systems if not s.startswith(prefix)]

    report = {
        "scenario": "moe-layer",
        "device": f"{world} x {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}",
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "deepspeed": ds_version,
        "ds_moe": ds_moe.__version__,
        "grouped_mm_available": ds_moe.grouped_mm_available(device, dtype),
        "fused_bias_act": fused_bias_act_available(device, dtype),
        "fused_gate": fused_gate_available(device, dtype),
        "fused_combine": fused_combine_available(device, dtype),
        "fused_route": fused_route_available(device),
        "config": {
            "d": args.d,
            "ffn": args.ffn_mult * args.d,
            "experts": args.experts,
            "ep": world,
            "tokens_per_rank": args.tokens,
            "dtype": args.dtype,
            "capacity_factor": args.capacity_factor,
            "warmup": args.warmup,
            "iters": args.iters,
            "repeats": args.repeats,
            "loss": args.loss,
        },  # fmt: skip
        "note_tokens_per_s": "tokens per second per GPU",
        "note_expert_tflops": "expert MLP FLOPs 6*2*tokens*k*2*d*ffn (same count for every "
        "system, whatever it pads or drops) per second per GPU",
        "runs": [],
    }
    if device.type == "cpu":
        # CPU timings on a shared machine: record how busy it was (1/5/15-minute load averages)
        report["host_load_avg"] = [round(v, 1) for v in os.getloadavg()]
        report["cpu_count"] = os.cpu_count()
    if args.check:
        report["check"] = check_parity(args, device, dtype)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if args.check and ds_version is not None:
        report["check_vs_deepspeed"] = check_against_deepspeed(args, device, dtype)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    ks = sorted({build_k(s) for s in systems})
    peak = {k: gemm_peak_tflops(args, k, device, dtype) for k in ks}
    report["gemm_peak_tflops"] = {f"k{k}": round(v, 3) for k, v in peak.items()}
    grouped = {k: grouped_gemm_tflops(args, k, device, dtype) for k in ks}
    # the grouped kernel alone on equal groups: how much of the gap to the dense GEMM is the
    # kernel's (the rest is the layer's routing, gathers, bias, activation, or skewed groups)
    report["grouped_gemm_tflops"] = {
        f"k{k}": (round(v, 3) if v else None) for k, v in grouped.items()
    }
    report["grouped_gemm_share_of_peak"] = {
        f"k{k}": (round(v / peak[k], 3) if v else None) for k, v in grouped.items()
    }
    if device.type == "cuda":
        torch.cuda.empty_cache()

    for k in ks:
        names = [s for s in systems if build_k(s) == k]
        layers = {}
        for name in names:
            # the same seed for each: every ds-moe variant gets the same router and expert
            # weights, so their A/Bs route the same load (a fresh router per system would
            # skew the groups differently and move the step by about 1%)
            torch.manual_seed(0)
            layers[name] = build_system(name, args, device, dtype)[0]
        gen = torch.Generator(device=device).manual_seed(rank)
        x = torch.randn(1, args.tokens, args.d, generator=gen, device=device).to(dtype)
        x.requires_grad_()
        times = {name: [] for name in names}
        peaks = dict.fromkeys(names, 0.0)
        for turn in range(args.repeats):
            # each turn starts one system later: a drift of the card's clocks or temperature
            # over a turn falls on every system alike, not always on the last ones
            shift = turn % len(names)
            for name in names[shift:] + names[:shift]:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                times[name].append(time_layer(layers[name], x, args, device))
                if device.type == "cuda":
                    peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device) / 2**30)
        flops = 3 * 2 * args.tokens * k * (2 * args.d * args.ffn_mult * args.d)
        for name in names:
            # every rank's median, then the slowest rank: the layer is only as fast as it
            t = torch.tensor([statistics.median(times[name])], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            step = t.item()
            tflops = flops / step / 1e12
            report["runs"].append({
                "system": name, "k": k, "step_s": round(step, 5),
                "tokens_per_s": round(args.tokens / step),
                "peak_mem_gb": round(peaks[name], 2) if device.type == "cuda" else None,
                "step_s_rank0_turns": [round(v, 5) for v in times[name]],
                "host_s_rank0": _round_or_none(host_seconds(layers[name], x, args, device)),
                "expert_tflops": round(tflops, 3),
                "expert_gemm_share_of_peak": round(tflops / peak[k], 3),
                **expert_rows(layers[name], x),
            })  # fmt: skip
        # the default layer, and the opt-in fused router next to it: their phases side by
        # side show where the router's kernels win or lose time
        for name in (f"ds-moe-top{k}", f"ds-moe-fusedgate-top{k}"):
            if args.phases and name in layers:
                report.setdefault("phases", {})[name] = phase_breakdown(
                    args, k, layers[name], x, flops, peak[k], dtype
                )
        del layers, x
        if device.type == "cuda":
            torch.cuda.empty_cache()

    by = {r["system"]: r for r in report["runs"]}
    ratios = {}
    for k in ks:
        ds = by.get(f"deepspeed-top{k}")
        for name in (f"ds-moe-top{k}", f"ds-moe-dropless-top{k}", f"ds-moe-unfused-top{k}",
                     f"ds-moe-unfusedcombine-top{k}", f"ds-moe-unfusedroute-top{k}",
                     f"ds-moe-fusedgate-top{k}",
                     f"ds-moe-loop-top{k}"):  # fmt: skip
            if ds and name in by:
                ratios[f"{name}/deepspeed-top{k} step_s"] = round(
                    ds["step_s"] / by[name]["step_s"], 3
                )
        # the A/B of each switch against the default layer, as "faster/slower": above 1 the
        # first-named path makes the step faster
        for faster, slower in (
            (f"ds-moe-top{k}", f"ds-moe-unfused-top{k}"),  # fused bias + activation
            (f"ds-moe-top{k}", f"ds-moe-unfusedcombine-top{k}"),  # single-pass combine
            (f"ds-moe-top{k}", f"ds-moe-unfusedroute-top{k}"),  # fused placement
            (f"ds-moe-fusedgate-top{k}", f"ds-moe-top{k}"),  # opt-in fused router logits
            (f"ds-moe-dropless-top{k}", f"ds-moe-top{k}"),  # dropless vs capacity 1.25
        ):
            if faster in by and slower in by:
                ratios[f"{faster}/{slower} step_s"] = round(
                    by[slower]["step_s"] / by[faster]["step_s"], 3
                )
    report["ratios"] = ratios
    report["goal"] = ("ds-moe-top1/top2 >= 1.5x deepspeed (ratios above 1 favour ds-moe); "
                      "expert_gemm_share_of_peak >= 0.6; dropless no slower than capacity 1.25")  # fmt: skip

    if rank == 0:
        stamp = datetime.date.today().strftime("%Y%m%d")
        tag = "-upstream-grad" if args.loss == "upstream-grad" else ""
        name = f"moe-layer-{device_slug(device)}-{stamp}{tag}.json"
        path = write_results(
            path=ROOT / "benchmarks" / "results" / name, copy_to_out=False, **report
        )
        print(path.read_text(), flush=True)
        extra = args.out or os.environ.get("OUT")
        if extra:
            pathlib.Path(extra).mkdir(parents=True, exist_ok=True)
            (pathlib.Path(extra) / name).write_text(path.read_text())
        print(f"[moe_bench] wrote {path}" + (f" and {extra}/{name}" if extra else ""), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
