"""The router's capacity and placement in three kernels instead of ~25 torch ops (CUDA, Triton).

``_routing.route`` ranks every assignment in its expert by priority with a counting sort of
small torch ops (marks, a running count, gathers; twice when capacity drops some), each a
kernel launch of a few microseconds on tensors of a few hundred KiB, plus the host's time to
issue it. ``ds_moe::route_place`` (``_route_kernels``) does the same with a scatter into
priority order, one histogram per chunk of priorities and one pass that places each
assignment from the histograms before it. Integers only: ``position``, ``order``, ``kept``
and the counts equal the torch path's exactly (the probe and the tests check it).

On an H100 at the benchmark's shape the layer step is 1.02-1.07x faster with them, far more
than their own 0.04 ms less kernel time: the GPU idled around the small torch kernels. On by
default where a probe (once per device) has checked the compiled kernels against the
torch path on CUDA, for routings without ``used_token`` (padding tokens keep the torch path):
``DS_MOE_FUSED_ROUTE=0`` (read on every forward) or ``TopKGate.fuse_route = False`` keeps
the torch ops.
"""

from __future__ import annotations

import functools
import importlib

import torch

from ds_moe._triton_op import probe_on_cuda, register, requested

ENV_VAR = "DS_MOE_FUSED_ROUTE"


def _kernels():
    # imported on first use: triton is optional, and importing it costs a second or so
    return importlib.import_module("ds_moe._route_kernels")


_LIB = torch.library.Library("ds_moe", "FRAGMENT")
_LIB.define(
    "route_place(Tensor expert_index, Tensor? token_rank, int num_experts, int cap, "
    "bool has_cap) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)


def _run(expert_index, token_rank, num_experts, cap, has_cap):
    return _kernels().place(expert_index, token_rank, num_experts, cap if has_cap else None)


def _meta(expert_index, token_rank, num_experts, cap, has_cap):
    n = expert_index.numel()
    new = functools.partial(torch.empty, device=expert_index.device, dtype=torch.int64)
    return (new(n), new(n), new(n, dtype=torch.bool), new(num_experts), new(num_experts),
            new(expert_index.shape), new(expert_index.shape), new(1 + n),
            new(num_experts, dtype=torch.int32))  # fmt: skip


register(_LIB, "route_place", _run, _meta, _kernels)


def place(
    expert_index: torch.Tensor,
    token_rank: torch.Tensor | None,
    num_experts: int,
    capacity_slots: int | None,
) -> tuple[torch.Tensor, ...]:
    """``(position, order, kept, exp_counts, kept_counts, row, dest, token_of_row, offs)`` of
    the [S, k] top-k ``expert_index`` with priorities ``choice * S + token_rank`` (``a`` itself
    when None): ``kept`` [S*k] bool in assignment order ``a = choice * S + token``; the last
    four are ``_local_dispatch.LocalLayout``'s fields of the same name."""
    cap = 0 if capacity_slots is None else int(capacity_slots)
    return torch.ops.ds_moe.route_place(
        expert_index, token_rank, num_experts, cap, capacity_slots is not None
    )


@functools.cache
def _probe(device_type: str, device_index: int | None) -> bool:
    device = torch.device(device_type, device_index)
    return probe_on_cuda(device_type, lambda: _self_check(device))


def _self_check(device: torch.device) -> bool:
    """The compiled kernels against the torch path: k = 1, 2, 3, with and without RTS
    priorities, capacity that drops and dropless, several chunks, 5 and 64 experts."""
    return all(compare_with_torch(device, *case) for case in _CASES)


#: (tokens, experts, k, capacity slots or None, RTS)
_CASES = (
    (3000, 5, 1, 500, True),
    (3000, 5, 2, None, True),
    (2500, 64, 2, 60, False),
    (700, 8, 3, 200, True),
    (1, 4, 1, 0, False),
)


def compare_with_torch(
    device: torch.device,
    tokens: int,
    experts: int,
    k: int,
    slots: int | None,
    rts: bool,
    *,
    skew: float = 1.0,
) -> bool:
    """One routing of random logits (the later experts favoured by ``skew``, so some overflow)
    through ``route`` fused and unfused: every integer field equal."""
    from ds_moe._routing import route

    g = torch.Generator(device=device).manual_seed(tokens + experts + k)
    logits = torch.randn(tokens, experts, device=device, generator=g)
    logits = logits + skew * torch.linspace(0, 1, experts, device=device)
    prio = torch.randperm(tokens, device=device, generator=g) if rts else None
    a = route(logits, k, capacity_slots=slots, token_priority=prio, fused=True)
    b = route(logits, k, capacity_slots=slots, token_priority=prio, fused=False)
    fields = ("expert_index", "kept", "order", "position", "kept_counts", "exp_counts")
    from ds_moe._local_dispatch import local_layout

    la, lb = local_layout(a), local_layout(b)
    layout_fields = ("row", "dest", "token_of_row", "offs", "assignment_of_row")
    if not all(torch.equal(getattr(la, f), getattr(lb, f)) for f in layout_fields):
        return False
    if a.local is None:  # the fused routing carries its layout
        return False
    same_loss = torch.allclose(a.l_aux, b.l_aux, rtol=0, atol=0, equal_nan=True)  # 0 tokens: NaN
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in fields) and same_loss


def fused_route_available(device: torch.device) -> bool:
    """True where the kernels can run (and passed the probe) on this device."""
    return _probe(device.type, device.index)


def fused_route_requested(flag: bool | None) -> bool:
    """Whether the fused placement is asked for: ``flag`` (``TopKGate.fuse_route``) when set,
    else ``DS_MOE_FUSED_ROUTE`` (``0`` off, ``1`` on), else on."""
    return requested(flag, ENV_VAR, default=True)
