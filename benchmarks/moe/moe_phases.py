"""Where an MoE layer's forward+backward spends its non-GEMM work, per phase.

    python benchmarks/moe/moe_phases.py                      # full bench shape on `meta`: counts
    python benchmarks/moe/moe_phases.py --device cpu --tokens 1024 --hidden 128 --profile

Every ATen op of one forward+backward (the benchmark's loss ``mean(out^2) + l_aux``) is
attributed to a *phase* of the layer by the Python frames that launched it: the live stack,
or for a backward op of a built-in autograd node the forward stack that anomaly mode records
on the node. Phases: ``gating`` (router linear, softmax, top-k, capacity, aux loss),
``layout`` (buffer rows, group ends), ``permute`` / ``combine`` (the two gathers), ``expert_gemm``
(the grouped GEMMs), ``bias``, ``activation``, ``bias_activation`` (ds-moe >= 0.1.6 on CUDA
with Triton: the first layer's bias and activation as one fused kernel each way; ``bias`` is then
the second layer's only and ``activation`` empty), ``contiguous_grad``, ``loss`` (the benchmark's
loss), ``grad_accumulate`` (autograd summing/storing leaf gradients), ``other``.

Counting (``count_ops``; a TorchDispatchMode, works on the ``meta`` device, so the benchmark's
full shape costs no memory): kernel launches (view and allocation ops excluded), bytes read +
written (from tensor sizes; a gather reads only the rows it selects) and GEMM FLOPs. From those,
an H100 estimate: each op ``max(flops / peak, bytes / bandwidth) + launch``. The estimate is a
model, not a measurement: ``moe_bench.py --phases`` measures the same phases on a GPU
(``profile_phases``: torch.profiler device time of each op, same attribution).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import json
import os
import pathlib
import re
import sys

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = pathlib.Path(__file__).resolve().parents[2]

#: H100 SXM model for the estimate: HBM3 bandwidth reached by large elementwise kernels, a
#: launch + tail cost per kernel, bf16 dense GEMM rate (this run's measured plain GEMM), fp32
#: (no TF32) GEMM rate
H100_BYTES_PER_S = 3.0e12
H100_LAUNCH_S = 4.5e-6
H100_BF16_FLOPS = 781e12
H100_FP32_FLOPS = 51e12

#: (file suffix, function name regex or None, phase), innermost frame first decides
_RULES: tuple[tuple[str, str | None, str], ...] = (
    # ds-moe's autograd Functions by class name, wherever the frame comes from (the profiler
    # names a Function's events after its class; its backward may run on a thread with no
    # Python frames recorded)
    ("", r"^_BiasAct", "bias_activation"),
    ("", r"^_GroupBias", "bias"),
    ("", r"^_ContiguousGrad", "contiguous_grad"),
    ("", r"^_(Fused)?Permute", "permute"),
    ("", r"^_(Fused)?Combine", "combine"),
    ("", r"^_ScaleGrad", "dispatch"),
    ("ds_moe/_bias_act.py", None, "bias_activation"),
    ("ds_moe/_bias_act_kernels.py", None, "bias_activation"),
    ("ds_moe/_grouped_gemm.py", r"_GroupBias|group_onehot|_add_group_bias|_group_sum", "bias"),
    ("ds_moe/_grouped_gemm.py", r"_ContiguousGrad", "contiguous_grad"),
    ("ds_moe/_grouped_gemm.py", None, "expert_gemm"),
    ("torch/nn/modules/activation.py", None, "activation"),
    ("torch/nn/functional.py", r"^(gelu|relu|silu|mish|elu|leaky_relu)", "activation"),
    ("ds_moe/_experts.py", r"_activation|_bias_act", "activation"),
    ("ds_moe/_local_dispatch.py", r"local_layout|_layout", "layout"),
    ("ds_moe/_local_dispatch.py", r"[Pp]ermute", "permute"),
    ("ds_moe/_local_dispatch.py", r"[Cc]ombine", "combine"),
    ("ds_moe/_combine.py", r"[Pp]ermute", "permute"),
    ("ds_moe/_combine.py", None, "combine"),
    ("ds_moe/_combine_kernels.py", None, "combine"),
    ("ds_moe/_comm.py", None, "all_to_all"),
    ("ds_moe/_dispatch.py", None, "dispatch"),
    ("ds_moe/_routing.py", None, "gating"),
    ("ds_moe/_gate.py", None, "gating"),
    ("ds_moe/_experts.py", None, "experts_other"),
    ("ds_moe/_layer.py", None, "layer_other"),
    ("moe_phases.py", r"_loss", "loss"),
    ("moe_bench.py", r"^time_layer$", "loss"),
)

_FRAME = re.compile(r'File "([^"]+)", line \d+, in (\S+)')

#: ops that launch no kernel: views, metadata, allocation
_NO_KERNEL = {
    "detach",
    "alias",
    "_unsafe_view",
    "empty",
    "empty_like",
    "empty_strided",
    "lift_fresh",
    "_local_scalar_dense",
    "set_",
    "resize_",
    "_to_copy_noop",
}
_FACTORIES = {"zeros", "ones", "full", "arange", "randperm", "rand", "randn", "scalar_tensor"}
_GATHERS = {"index_select", "gather", "embedding"}
_GEMMS = {"mm", "addmm", "bmm", "baddbmm", "_grouped_mm", "addmm_", "matmul", "linear"}


def classify(frames: list[tuple[str, str]]) -> str | None:
    """The phase of the innermost frame that a rule matches; frames are (file, function), a
    ``_phase_labels`` range being ("<label>", phase)."""
    for filename, func in reversed(frames):
        if filename == "<label>":
            return func
        fn = filename.replace(os.sep, "/")
        for suffix, pattern, phase in _RULES:
            if fn.endswith(suffix) and (pattern is None or re.search(pattern, func)):
                return phase
    return None


def _live_frames() -> list[tuple[str, str]]:
    """(file, qualified function) of every live frame, outermost first."""
    frames = []
    f = sys._getframe(1)
    while f is not None:
        code = f.f_code
        frames.append((code.co_filename, getattr(code, "co_qualname", code.co_name)))
        f = f.f_back
    return frames[::-1]


def _node_frames(node) -> list[tuple[str, str]]:
    """The forward stack anomaly mode stored on an autograd node (empty without it)."""
    try:
        lines = node.metadata.get("traceback_") or []
    except (AttributeError, RuntimeError):
        return []
    text = "".join(lines) if isinstance(lines, list) else str(lines)
    return _FRAME.findall(text)


def _tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a kernel touches for ``t``: its elements, or less for an expanded view."""
    full = t.numel() * t.element_size()
    try:
        return min(full, t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return full


def _tensors(obj) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            out.extend(_tensors(o))
    elif isinstance(obj, dict):
        for o in obj.values():
            out.extend(_tensors(o))
    return out


def _gemm_flops(name: str, args, out) -> tuple[int, bool]:
    """(FLOPs, fp32) of a GEMM-like op; (0, False) for anything else."""
    if name not in _GEMMS:
        return 0, False
    ts = _tensors(args)
    if name == "_grouped_mm":
        a, b = ts[0], ts[1]
        if a.dim() == 2 and b.dim() == 3:  # rows x K @ [G, K, N]: every row once
            flops = 2 * a.shape[0] * a.shape[1] * b.shape[2]
        elif a.dim() == 2 and b.dim() == 2:  # [M, T] @ [T, N] split over T: G outputs
            flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
        else:
            flops = 2 * out.numel() * a.shape[-1]
        return flops, a.dtype == torch.float32
    o = _tensors(out)[0]
    mats = [t for t in ts if t.dim() >= 2]
    inner = mats[-1].shape[-2] if mats else 1
    return 2 * o.numel() * inner, o.dtype == torch.float32


@dataclasses.dataclass
class OpRecord:
    phase: str
    backward: bool
    op: str
    bytes: int
    flops: int
    fp32: bool

    def est_s(self) -> float:
        peak = H100_FP32_FLOPS if self.fp32 else H100_BF16_FLOPS
        return max(self.flops / peak, self.bytes / H100_BYTES_PER_S) + H100_LAUNCH_S


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[OpRecord] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in _NO_KERNEL or func.is_view or name.startswith("_has_"):
            return out
        node = torch._C._current_autograd_node()
        phase = classify(_live_frames())
        if node is not None:
            if phase is None:
                phase = (
                    "grad_accumulate"
                    if "AccumulateGrad" in node.name()
                    else classify(_node_frames(node))
                )
            if phase is None and name in ("add", "add_", "copy_"):
                phase = "grad_accumulate"  # the engine summing two gradients of one tensor
        ins = _tensors((args, kwargs))
        outs = _tensors(out)
        if name in _FACTORIES or name.startswith("new_") or name.endswith("_like"):
            nbytes = sum(_tensor_bytes(t) for t in outs)  # writes only: the input is a template
        elif name == "gather_sum":  # reads the k rows of each output row, writes it
            index = args[1]
            nbytes = (1 + index.shape[1]) * sum(map(_tensor_bytes, outs)) + sum(
                _tensor_bytes(t) for t in ins[1:]
            )
        elif name == "combine_backward":  # grad_out once, k rows of y read, k rows written
            grad_out, grad_y = args[0], outs[0]
            nbytes = _tensor_bytes(grad_out) + 2 * _tensor_bytes(grad_y)
        elif name in _GATHERS:
            index = [t for t in ins if not t.is_floating_point()]
            nbytes = 2 * sum(_tensor_bytes(t) for t in outs) + sum(map(_tensor_bytes, index))
        else:
            seen, nbytes = set(), 0
            for t in ins + outs:
                key = (id(t), t.data_ptr() if t.device.type != "meta" else id(t))
                if key not in seen:
                    seen.add(key)
                    nbytes += _tensor_bytes(t)
            # an in-place op's output is its input: read and written
            nbytes += sum(_tensor_bytes(t) for t in outs if any(t is i for i in ins))
        flops, fp32 = _gemm_flops(name, args, out)
        self.records.append(OpRecord(phase or "other", node is not None, name, nbytes, flops, fp32))
        return out


def bench_loss(out: torch.Tensor, l_aux: torch.Tensor) -> torch.Tensor:
    """The benchmark's loss (moe_bench.py's ``time_layer``)."""
    return out.float().square().mean() + l_aux


def count_ops(layer: nn.Module, x: torch.Tensor, steady_state: bool = True) -> list[OpRecord]:
    """Every kernel of one forward + backward of ``layer(x)`` with the benchmark's loss.

    ``steady_state``: count the second step of a loop that never zeroes gradients, as the
    benchmark times it (from the second step on, every leaf gradient is an in-place add).
    """
    if steady_state:
        out, l_aux, _ = layer(x)
        _bench_loss(out, l_aux).backward()
    counter = _Counter()
    with torch.autograd.set_detect_anomaly(True, check_nan=False), counter:
        out, l_aux, _ = layer(x)
        _bench_loss(out, l_aux).backward()
    return counter.records


def _bench_loss(out, l_aux):
    return bench_loss(out, l_aux)


def summarize(records: list[OpRecord]) -> dict:
    """Per (phase, direction): launches, MiB moved, GFLOP, estimated H100 ms; plus totals."""
    table: dict[str, dict] = {}
    for r in records:
        key = f"{r.phase}.{'bwd' if r.backward else 'fwd'}"
        e = table.setdefault(key, {"launches": 0, "mib": 0.0, "gflop": 0.0, "est_ms": 0.0})
        e["launches"] += 1
        e["mib"] += r.bytes / 2**20
        e["gflop"] += r.flops / 1e9
        e["est_ms"] += r.est_s() * 1e3
        ops = e.setdefault("ops", collections.Counter())
        ops[r.op] += 1
    for e in table.values():
        e["mib"] = round(e["mib"], 1)
        e["gflop"] = round(e["gflop"], 2)
        e["est_ms"] = round(e["est_ms"], 4)
        e["ops"] = dict(e["ops"].most_common())
    non_gemm = [r for r in records if r.phase != "expert_gemm"]
    totals = {
        "launches": len(records),
        "non_gemm_launches": len(non_gemm),
        "non_gemm_mib": round(sum(r.bytes for r in non_gemm) / 2**20, 1),
        "non_gemm_est_ms": round(sum(r.est_s() for r in non_gemm) * 1e3, 3),
        "expert_gemm_est_ms": round(
            sum(r.est_s() for r in records if r.phase == "expert_gemm") * 1e3, 3
        ),
    }
    return {"phases": dict(sorted(table.items())), "totals": totals}


#: name prefix of the profiler ranges ``_phase_labels`` opens
_LABEL = "ds_moe_phase::"


@contextlib.contextmanager
def _phase_labels(layer: nn.Module):
    """Profiler ranges (``record_function``) around the layer's parts while profiling: the
    layer's and the experts' forwards (layer_other, experts_other), the gate's forward
    (gating), the grouped GEMMs (expert_gemm), the one-hot bias matrix (bias), the buffer
    layout (layout) and the activation module (activation); the innermost range decides, and
    ds-moe's autograd Functions name their own events (a ``_GroupBias`` inside a grouped GEMM
    is bias). This attribution needs no Python frames: on Python 3.12 with torch 2.11 the
    profiler recorded none (only the Functions' events had names, every other op fell in
    ``other``), and with torch 2.13 on Python 3.11 it cannot record frames and these ranges
    together (it fails decoding an event name), so ``profile_phases`` uses one or the other."""
    from torch.autograd.profiler import record_function

    import ds_moe._experts as experts_mod
    import ds_moe._layer as layer_mod

    def labelled(fn, phase: str):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            with record_function(_LABEL + phase):
                return fn(*args, **kwargs)

        return run

    undo: list[tuple[object, str, bool, object]] = []

    def wrap(obj, attr: str, phase: str) -> None:
        if obj is None or getattr(obj, attr, None) is None:
            return
        own = attr in vars(obj)  # a module's global, or an instance's own forward
        undo.append((obj, attr, own, vars(obj).get(attr)))
        setattr(obj, attr, labelled(getattr(obj, attr), phase))

    wrap(layer, "forward", "layer_other")
    wrap(getattr(layer, "experts", None), "forward", "experts_other")
    wrap(experts_mod, "grouped_linear", "expert_gemm")
    wrap(experts_mod, "group_onehot", "bias")
    wrap(layer_mod, "local_layout", "layout")
    wrap(getattr(layer, "gate", None), "forward", "gating")
    wrap(getattr(getattr(layer, "experts", None), "activation", None), "forward", "activation")
    try:
        yield
    finally:
        for obj, attr, own, old in reversed(undo):
            if own:
                setattr(obj, attr, old)
            else:
                delattr(obj, attr)  # the class's method again


#: ops listed per phase by ``profile_phases`` (its ``top_ops``)
TOP_OPS = 8


def profile_phases(
    layer: nn.Module, x: torch.Tensor, iters: int = 3, with_stack: bool = False
) -> dict:
    """Measured time per phase: torch.profiler's kernel time (CPU time on a CPU) of each op.

    Attribution: the ranges of ``_phase_labels`` (default), or with ``with_stack`` an op's
    Python stack as in ``count_ops`` (where the profiler records frames); a backward op
    without either takes the phase of the forward op of the same autograd sequence number.
    Returns per phase the mean milliseconds per iteration, the number of kernels (device)
    or ops (CPU), and ``top_ops``: its costliest ops by name, ``[name, ms, kernels]`` per
    iteration (up to ``TOP_OPS``), to show which of a phase's many small launches cost most.
    """
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    cuda = x.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for _ in range(2):  # warm-up: caches, autotuning, the grouped-GEMM probe
        out, l_aux, _ = layer(x)
        _bench_loss(out, l_aux).backward()
    if cuda:
        torch.cuda.synchronize(x.device)
    labels = contextlib.nullcontext() if with_stack else _phase_labels(layer)
    with labels, profile(activities=acts, with_stack=with_stack, record_shapes=False) as prof:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        for _ in range(iters):
            out, l_aux, _ = layer(x)
            with record_function(_LABEL + "loss"):
                loss = _bench_loss(out, l_aux)
            loss.backward()
        if cuda:
            end.record()
            torch.cuda.synchronize(x.device)
    events = [ev for ev in prof.events() if ev.device_type == DeviceType.CPU]
    fwd_phase: dict[int, str] = {}
    for ev in events:
        if ev.sequence_nr >= 0 and not _in_backward(ev):
            ph = classify(_profiler_frames(ev))
            if ph is not None:
                fwd_phase.setdefault(ev.sequence_nr, ph)

    def phase_of(ev) -> tuple[str, bool]:
        ph = classify(_profiler_frames(ev))
        node = ev
        while node is not None:
            if node.name.startswith("autograd::engine::evaluate_function"):
                if ph is not None:
                    return ph, True
                if "AccumulateGrad" in node.name:
                    return "grad_accumulate", True
                return fwd_phase.get(node.sequence_nr, "other"), True
            node = node.cpu_parent
        return ph or "other", False

    totals: dict[str, dict] = {}
    by_op: dict[str, dict[str, list[float]]] = {}
    for ev in events:
        if not cuda and (ev.cpu_children or not ev.name.startswith("aten::")):
            continue  # CPU: self time of leaf ATen ops only
        if cuda:
            t_us = sum(k.duration for k in getattr(ev, "kernels", []))
            n = len(getattr(ev, "kernels", []))
        else:
            t_us, n = ev.self_cpu_time_total, 1
        if n == 0 or (cuda and t_us == 0):
            continue
        ph, bwd = phase_of(ev)
        key = f"{ph}.{'bwd' if bwd else 'fwd'}"
        e = totals.setdefault(key, {"ms": 0.0, "kernels": 0})
        e["ms"] += t_us / 1e3 / iters
        e["kernels"] += n / iters
        op = by_op.setdefault(key, {}).setdefault(ev.name, [0.0, 0.0])
        op[0] += t_us / 1e3 / iters
        op[1] += n / iters
    busy = sum(e["ms"] for e in totals.values())
    for key, e in totals.items():
        e["ms"] = round(e["ms"], 4)
        e["kernels"] = round(e["kernels"], 1)
        ranked = sorted(by_op[key].items(), key=lambda kv: -kv[1][0])[:TOP_OPS]
        e["top_ops"] = [[name, round(ms, 4), round(k, 1)] for name, (ms, k) in ranked]
    result: dict = {"phases": dict(sorted(totals.items())), "busy_ms": round(busy, 4)}
    if cuda:
        # wall time of a profiled step (the profiler adds some host overhead) and the part
        # of it with no kernel running: launch gaps the host could not hide
        wall = start.elapsed_time(end) / iters
        result["wall_ms"] = round(wall, 4)
        result["idle_ms"] = round(wall - busy, 4)
    return result


def _in_backward(ev) -> bool:
    node = ev.cpu_parent
    while node is not None:
        if node.name.startswith("autograd::engine::evaluate_function"):
            return True
        node = node.cpu_parent
    return False


def _profiler_frames(ev) -> list[tuple[str, str]]:
    """(file, function) of the Python frames above a profiler event, outermost first.

    With ``with_stack`` the profiler records Python calls as parent events named
    ``path(line): func``, and an autograd Function as an event of its class name (``_Combine``,
    ``_CombineBackward``) above its ``forward``/``backward`` frame: that frame becomes
    ``_Combine.forward`` so the rules see the class, as ``co_qualname`` shows it live.
    """
    inner_first: list[list[str]] = []
    node = ev
    while node is not None:
        m = re.match(r"(.+)\(\d+\): (.+)", node.name)
        if node.name.startswith(_LABEL):
            inner_first.append(["<label>", node.name[len(_LABEL) :]])
        elif m:
            inner_first.append([m.group(1), m.group(2)])
        elif re.match(r"^_[A-Z]\w*$", node.name):
            cls = node.name.removesuffix("Backward")
            for frame in inner_first:
                if frame[1] in ("forward", "backward"):
                    frame[1] = f"{cls}.{frame[1]}"
                    break
            inner_first.append(["<autograd.Function>", cls])
        node = node.cpu_parent
    return [(f, fn) for f, fn in reversed(inner_first)]


@contextlib.contextmanager
def _grouped_kernel_assumed(
    fused_bias_act: bool = False, fused_combine: bool = False, fused_route: bool = False
):
    """Count the CUDA path on ``meta``: the grouped-kernel probe cannot run on meta tensors.

    ``fused_combine``: count ds-moe's single-pass combine and permutation backward (0.1.10+,
    the default where its kernels run) instead of the unfused gathers; ``fused_route``: its
    placement kernels (0.1.10+, the default) instead of the router's torch ops.

    ``fused_bias_act``: count ds-moe's fused bias + activation kernel (0.1.6+, CUDA with
    Triton, the default from 0.1.9; its meta kernel gives its bytes) as if
    ``DS_MOE_FUSED_BIAS_ACT=1``; False counts the separate bias and activation passes (the
    path with ``DS_MOE_FUSED_BIAS_ACT=0``, and every path before 0.1.9 unless switched on).
    """
    import ds_moe._grouped_gemm as gg

    try:
        import ds_moe._bias_act as ba
    except ImportError:  # ds-moe < 0.1.6
        ba = None
    try:
        import ds_moe._combine as cb
        import ds_moe._route_fused as rf
    except ImportError:  # ds-moe < 0.1.10
        cb = rf = None
    saved = gg._probe
    saved_ba = ba._probe if ba is not None else None
    saved_cb = cb._probe if cb is not None else None
    saved_rf = rf._probe if rf is not None else None
    saved_env = os.environ.get("DS_MOE_FUSED_BIAS_ACT")
    os.environ["DS_MOE_FUSED_BIAS_ACT"] = "1" if fused_bias_act else "0"
    gg._probe = lambda *a: True  # noqa: SLF001 - diagnostic only, restored below
    if ba is not None:
        ba._probe = lambda *a: fused_bias_act  # noqa: SLF001
    if cb is not None:
        cb._probe = lambda *a: fused_combine  # noqa: SLF001
        rf._probe = lambda *a: fused_route  # noqa: SLF001
    try:
        yield
    finally:
        gg._probe = saved
        if ba is not None:
            ba._probe = saved_ba
        if cb is not None:
            cb._probe = saved_cb
            rf._probe = saved_rf
        if saved_env is None:
            os.environ.pop("DS_MOE_FUSED_BIAS_ACT", None)
        else:
            os.environ["DS_MOE_FUSED_BIAS_ACT"] = saved_env


def build_layer(d, ffn, experts, k, capacity_factor, tokens, device, dtype, **kw):
    """The benchmark's ds-moe layer (ep 1) and a [1, tokens, d] input that wants a gradient."""
    import ds_moe

    torch.manual_seed(0)
    # on meta, build there: no host memory or init time for full-size weights
    where = (
        torch.device("meta") if torch.device(device).type == "meta" else contextlib.nullcontext()
    )
    with where:
        expert = nn.Sequential(nn.Linear(d, ffn), nn.GELU(), nn.Linear(ffn, d))
        layer = ds_moe.MoE(d, expert, num_experts=experts, k=k, capacity_factor=capacity_factor,
                           **kw)  # fmt: skip
    layer = layer.to(device=device, dtype=dtype).train()
    x = torch.randn(1, tokens, d, dtype=dtype, device=device, requires_grad=True)
    return layer, x


def model_on_meta(
    d, ffn, experts, k, capacity_factor, tokens, dtype, fused_bias_act=False,
    fused_combine=False, fused_route=False, **kw,
) -> dict:  # fmt: skip
    """``summarize(count_ops(...))`` of the CUDA path at full size on the ``meta`` device."""
    with _grouped_kernel_assumed(fused_bias_act, fused_combine, fused_route):
        layer, x = build_layer(d, ffn, experts, k, capacity_factor, tokens, "meta", dtype, **kw)
        return summarize(count_ops(layer, x))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn-mult", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--k", type=int, nargs="+", default=[1, 2])
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--device", default="meta")
    p.add_argument("--profile", action="store_true", help="also measure (not on meta)")
    p.add_argument("--json", default=None, help="write the result here")
    p.add_argument("--fresh-grads", action="store_true",
                   help="count a first step (no leaf gradient to add to)")  # fmt: skip
    p.add_argument("--fused-bias-act", action="store_true",
                   help="on meta: count ds-moe's opt-in fused bias + activation kernel instead "
                   "of the separate passes (the default path)")  # fmt: skip
    p.add_argument("--fused-combine", action="store_true",
                   help="on meta: count the single-pass combine and permutation backward "
                   "(the default path on CUDA from ds-moe 0.1.10)")  # fmt: skip
    p.add_argument("--fused-route", action="store_true",
                   help="on meta: count the router's placement kernels (the default on CUDA "
                   "from ds-moe 0.1.10)")  # fmt: skip
    args = p.parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    device = torch.device(args.device)
    result = {"config": vars(args), "model": {
        "bytes_per_s": H100_BYTES_PER_S, "launch_s": H100_LAUNCH_S,
        "bf16_flops": H100_BF16_FLOPS, "fp32_flops": H100_FP32_FLOPS}}  # fmt: skip
    sys.path[:0] = [str(p) for p in sorted((ROOT / "packages").glob("*/src"))]
    ffn = args.ffn_mult * args.hidden
    for k in args.k:
        shape = (args.hidden, ffn, args.experts, k, args.capacity_factor, args.tokens)
        if device.type == "meta":
            with _grouped_kernel_assumed(args.fused_bias_act, args.fused_combine, args.fused_route):
                layer, x = build_layer(*shape, device, dtype)
                entry = summarize(count_ops(layer, x, steady_state=not args.fresh_grads))
        else:
            layer, x = build_layer(*shape, device, dtype)
            entry = summarize(count_ops(layer, x, steady_state=not args.fresh_grads))
            if args.profile:
                entry["profile"] = profile_phases(layer, x)
        result[f"k{k}"] = entry
    text = json.dumps(result, indent=1, default=str)
    if args.json:
        pathlib.Path(args.json).write_text(text)
    print(text)
    with contextlib.suppress(Exception):
        for k in args.k:
            t = result[f"k{k}"]["totals"]
            print(f"k={k}: non-GEMM {t['non_gemm_launches']} launches, "
                  f"{t['non_gemm_mib']:.0f} MiB, est {t['non_gemm_est_ms']:.2f} ms on H100; "
                  f"expert GEMMs est {t['expert_gemm_est_ms']:.2f} ms", file=sys.stderr)  # fmt: skip


if __name__ == "__main__":
    main()
