"""The printed profile, in DeepSpeed's layout: summary, top modules per depth, module tree.

Scripts and dashboards scrape DeepSpeed's profile text, so the headings and the summary labels
are DeepSpeed's. The module tree is rendered here (nn.Module's own layout, with the numbers in
front of each module's extra_repr) instead of swapping ``extra_repr`` on the user's modules.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Any

from torch import nn

from ds_profile._format import (
    DEFAULT_PRECISION,
    duration_to_string,
    flops_to_string,
    macs_to_string,
    number_to_string,
    params_to_string,
)

if TYPE_CHECKING:
    from ds_profile._profiler import FlopsProfiler

_LINE = "{:<70}  {:<8}"
_NOTATIONS = (
    "Notations:\n"
    "data parallel size (dp_size), model parallel size(mp_size),\n"
    "number of parameters (params), number of multiply-accumulate operations(MACs),\n"
    "number of floating-point operations (flops), floating-point operations per second (FLOPS),\n"
    "fwd latency (forward propagation latency), bwd latency (backward propagation latency),\n"
    "step (weights update latency), iter latency (sum of fwd, bwd and step latency)\n"
)
_DETAILED_NOTE = (
    "Each module profile is listed after its name in the following order: \n"
    "params, percentage of total params, MACs, percentage of total MACs, fwd latency, "
    "percentage of total fwd latency, fwd FLOPS\n\n"
    "Note: 1. A module can have torch.nn.module or torch.nn.functional to compute logits (e.g. "
    "CrossEntropyLoss). They are not counted as submodules, thus not to be printed out. However "
    "they make up the difference between a parent's MACs (or latency) and the sum of its "
    "submodules'.\n2. Number of floating-point operations is a theoretical estimation, thus FLOPS "
    "computed using that could be larger than the maximum system throughput.\n3. The fwd latency "
    "listed in the top module's profile is directly captured at the module forward function in "
    "PyTorch, thus it's less than the fwd latency shown above which is captured in DeepSpeed.\n"
)


@contextlib.contextmanager
def _destination(output_file: str | None) -> Iterator[IO[str]]:
    if not output_file:
        yield sys.stdout
        return
    os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
    with open(output_file, "w", encoding="utf-8") as f:
        yield f


def _pct(part: float, total: float) -> float:
    return round(100 * part / total, DEFAULT_PRECISION) if total else 0


def _engine_lines(prof: FlopsProfiler, flops: int) -> list[str]:
    """World sizes and the backward/step figures, when an engine supplies them."""
    eng = prof.ds_engine
    lines: list[str] = []
    mp = int(getattr(eng, "mp_world_size", 1) or 1) if eng is not None else 1
    if eng is not None:
        lines.append(_LINE.format("world size: ", getattr(eng, "world_size", 1)))
        lines.append(_LINE.format("data parallel size: ", getattr(eng, "dp_world_size", 1)))
        lines.append(_LINE.format("model parallel size: ", mp))
        lines.append(_LINE.format("batch size per GPU: ", eng.train_micro_batch_size_per_gpu()))
    lines.append(_LINE.format("params per GPU: ", params_to_string(prof.params)))
    lines.append(_LINE.format("params of model = params per GPU * mp_size: ",
                              params_to_string(prof.params * mp)))  # fmt: skip
    lines.append(_LINE.format("fwd MACs per GPU: ", macs_to_string(prof.macs)))
    lines.append(_LINE.format("fwd flops per GPU: ", number_to_string(flops)))
    lines.append(_LINE.format("fwd flops of model = fwd flops per GPU * mp_size: ",
                              number_to_string(flops * mp)))  # fmt: skip
    bwd_measured = int(prof.get_total_backward_flops())
    if bwd_measured:
        lines.append(_LINE.format("bwd flops per GPU (measured): ", number_to_string(bwd_measured)))
    latencies = (
        eng.profile_latencies() if eng is not None and hasattr(eng, "profile_latencies") else None
    )
    fwd = float(prof.get_total_duration())
    if latencies:
        fwd = latencies.get("fwd", fwd)
    lines.append(_LINE.format("fwd latency: ", duration_to_string(fwd)))
    lines.append(_LINE.format("fwd FLOPS per GPU = fwd flops per GPU / fwd latency: ",
                              flops_to_string(flops / fwd if fwd else 0)))  # fmt: skip
    if latencies and latencies.get("bwd") and latencies.get("step") is not None:
        factor = 2 + prof.recompute_fwd_factor
        bwd, step = latencies["bwd"], latencies["step"]
        it = fwd + bwd + step
        lines += [
            _LINE.format("bwd latency: ", duration_to_string(bwd)),
            _LINE.format(f"bwd FLOPS per GPU = {factor:g} * fwd flops per GPU / bwd latency: ",
                         flops_to_string(factor * flops / bwd)),
            _LINE.format(f"fwd+bwd FLOPS per GPU = {factor + 1:g} * fwd flops per GPU / (fwd+bwd latency): ",
                         flops_to_string((factor + 1) * flops / (fwd + bwd))),
            _LINE.format("step latency: ", duration_to_string(step)),
            _LINE.format("iter latency: ", duration_to_string(it)),
            _LINE.format(f"FLOPS per GPU = {factor + 1:g} * fwd flops per GPU / iter latency: ",
                         flops_to_string((factor + 1) * flops / it)),
        ]  # fmt: skip
        if eng is not None:
            samples = eng.train_micro_batch_size_per_gpu() * getattr(eng, "world_size", 1)
            lines.append(_LINE.format("samples/second: ", round(samples / it, DEFAULT_PRECISION)))
    return lines


def aggregated_lines(prof: FlopsProfiler, module_depth: int, top_modules: int) -> list[str]:
    """Per depth, the top module classes by params, MACs and latency (summed per class)."""
    info: list[dict[str, list[float]]] = []

    def walk(module: nn.Module, depth: int) -> None:
        while len(info) <= depth:
            info.append({})
        row = info[depth].setdefault(type(module).__name__, [0, 0, 0.0])
        row[0] += prof.module_macs(module)
        row[1] += prof.module_params(module)
        row[2] += prof.module_duration(module)
        for child in module.children():
            walk(child, depth + 1)

    walk(prof.model, 0)
    # DeepSpeed prints depths 0 .. depth-1, where -1 means "all but the innermost"
    depth = len(info) - 1 if module_depth == -1 else module_depth
    lines = [
        f"Top {top_modules} modules in terms of params, MACs or fwd latency at different model depths:"
    ]
    for d in range(min(depth, len(info))):
        n = min(top_modules, len(info[d]))

        def top(i: int, fmt: Any, d: int = d, n: int = n) -> dict[str, str]:
            ranked = sorted(info[d].items(), key=lambda kv: kv[1][i], reverse=True)[:n]
            return {k: fmt(v[i]) for k, v in ranked}

        lines += [
            f"depth {d}:",
            f"    params      - {top(1, params_to_string)}",
            f"    MACs        - {top(0, macs_to_string)}",
            f"    fwd latency - {top(2, duration_to_string)}",
        ]
    return lines


def _module_items(prof: FlopsProfiler, module: nn.Module, totals: tuple[int, int, float]) -> str:
    params, macs = prof.module_params(module), prof.module_macs(module)
    flops, duration = prof.module_flops(module), prof.module_duration(module)
    items = [
        f"{params_to_string(params)} = {_pct(params, totals[0]):g}% Params",
        f"{macs_to_string(macs)} = {_pct(macs, totals[1]):g}% MACs",
        f"{duration_to_string(duration)} = {_pct(duration, totals[2]):g}% latency",
        flops_to_string(round(flops / duration, DEFAULT_PRECISION) if duration else 0),
    ]
    extra = module.extra_repr()
    if extra:
        items.append(extra)
    return ", ".join(items)


def _indent(text: str, spaces: int) -> str:
    first, *rest = text.split("\n")
    return "\n".join([first] + [" " * spaces + line for line in rest])


def module_tree(prof: FlopsProfiler, module: nn.Module, totals: tuple[int, int, float]) -> str:
    """nn.Module's repr layout with each module's numbers in front of its extra_repr."""
    extra_lines = _module_items(prof, module, totals).split("\n")
    children = [
        f"({name}): {_indent(module_tree(prof, child, totals), 2)}"
        for name, child in module.named_children()
    ]
    head = f"{module._get_name()}("
    if not children and len(extra_lines) == 1:
        return head + extra_lines[0] + ")"
    return head + "\n  " + "\n  ".join(extra_lines + children) + "\n)"


def print_profile(prof: FlopsProfiler, profile_step: int, module_depth: int, top_modules: int,
                  detailed: bool, output_file: str | None) -> None:  # fmt: skip
    flops = prof.flops
    lines = [
        "\n-------------------------- DeepSpeed Flops Profiler --------------------------",
        f"Profile Summary at step {profile_step}:",
        _NOTATIONS,
        *_engine_lines(prof, flops),
        "\n----------------------------- Aggregated Profile per GPU -----------------------------",
        *aggregated_lines(prof, module_depth, top_modules),
    ]
    if detailed:
        totals = (prof.params, prof.macs, float(prof.get_total_duration()))
        lines += [
            "\n------------------------------ Detailed Profile per GPU ------------------------------",
            _DETAILED_NOTE,
            module_tree(prof, prof.model, totals),
        ]
    lines.append("------------------------------------------------------------------------------")
    with _destination(output_file) as out:
        print("\n".join(lines), file=out)
