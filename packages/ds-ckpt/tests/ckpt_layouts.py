"""Deterministic model+optimizer states and the fragments each parallel layout would hold.

Layouts mirror what ds_zero/ds_pipe produce without importing them: stage 1/2 partition one flat
buffer of all parameters, stage 3 partitions each parameter, pipeline stages hold whole layers.
"""

from __future__ import annotations

import math

import torch

from ds_ckpt import Fragment

Range = tuple[str, int, int]  # (name, offset, numel)


def make_state(seed: int = 0, layers: int = 3, d: int = 12) -> dict[str, torch.Tensor]:
    """Weights, Adam moments and per-param step counters; odd sizes make splits uneven."""
    g = torch.Generator().manual_seed(seed)
    params: dict[str, torch.Tensor] = {"embed.weight": torch.randn(17, d, generator=g)}
    for i in range(layers):
        params[f"layers.{i}.attn.qkv.weight"] = torch.randn(3 * d, d, generator=g)
        params[f"layers.{i}.attn.qkv.bias"] = torch.randn(3 * d, generator=g)
        params[f"layers.{i}.mlp.weight"] = torch.randn(d, d + 1, generator=g)
        params[f"layers.{i}.norm.weight"] = torch.randn(d, generator=g).to(torch.bfloat16)
    params["head.weight"] = torch.randn(5, d, generator=g)
    state = dict(params)
    for n, p in params.items():
        state[f"optimizer.exp_avg.{n}"] = torch.randn(p.shape, generator=g)
        state[f"optimizer.exp_avg_sq.{n}"] = torch.rand(p.shape, generator=g)
        state[f"optimizer.step.{n}"] = torch.tensor([7], dtype=torch.int64)
    return state


def param_names(state: dict[str, torch.Tensor]) -> list[str]:
    return [n for n in state if not n.startswith("optimizer.")]


def _group(state: dict[str, torch.Tensor], key: str) -> list[str]:
    """Names of one flat buffer: the params, or one optimizer state key over all params."""
    if key == "param":
        return param_names(state)
    return [f"optimizer.{key}.{n}" for n in param_names(state)]


def _split(total: int, parts: int, r: int, uneven: bool) -> tuple[int, int]:
    if uneven:  # the first rank gets a double share: tests ranges that are nowhere aligned
        w = [2] + [1] * (parts - 1)
        bounds = [total * sum(w[:i]) // sum(w) for i in range(parts + 1)]
        return bounds[r], bounds[r + 1]
    chunk = math.ceil(total / parts)
    return min(total, r * chunk), min(total, (r + 1) * chunk)


def flat_ranges(
    state: dict[str, torch.Tensor], dp: int, r: int, uneven: bool = False
) -> list[Range]:
    """ZeRO stage 1/2: each buffer (params, exp_avg, ...) is one flat concatenation split dp-way.

    The per-param step counter goes to the rank that owns the param's first element.
    """
    out: list[Range] = []
    for key in ("param", "exp_avg", "exp_avg_sq"):
        names = _group(state, key)
        total = sum(state[n].numel() for n in names)
        a, b = _split(total, dp, r, uneven)
        pos = 0
        for n in names:
            k = state[n].numel()
            lo, hi = max(a, pos), min(b, pos + k)
            if lo < hi:
                out.append((n, lo - pos, hi - lo))
                if key == "param" and lo == pos:
                    out.append((f"optimizer.step.{n}", 0, 1))
            pos += k
    return out


def per_param_ranges(state: dict[str, torch.Tensor], dp: int, r: int) -> list[Range]:
    """ZeRO stage 3: every tensor split dp-way on its own; steps owned by rank 0."""
    out: list[Range] = []
    for n, t in state.items():
        if n.startswith("optimizer.step."):
            if r == 0:
                out.append((n, 0, 1))
            continue
        a, b = _split(t.numel(), dp, r, uneven=False)
        if a < b:
            out.append((n, a, b - a))
    return out


def replicated_ranges(state: dict[str, torch.Tensor]) -> list[Range]:
    return [(n, 0, t.numel()) for n, t in state.items()]


def pipeline_ranges(state: dict[str, torch.Tensor], pp: int, stage: int) -> list[Range]:
    """Whole layers per stage, matched by name; embed on the first stage, head on the last."""
    layers = sorted({int(n.split("layers.")[1].split(".")[0]) for n in state if "layers." in n})
    per = math.ceil(len(layers) / pp)
    mine = set(layers[stage * per : (stage + 1) * per])
    out = []
    for n, t in state.items():
        base = n.split("optimizer.")[-1].split(".", 1)[-1] if n.startswith("optimizer.") else n
        if "layers." in base:
            keep = int(base.split("layers.")[1].split(".")[0]) in mine
        else:
            keep = (stage == 0) if base.startswith("embed") else (stage == pp - 1)
        if keep:
            out.append((n, 0, t.numel()))
    return out


def fragments(state: dict[str, torch.Tensor], ranges: list[Range]) -> list[Fragment]:
    """Fragments whose tensors are views into `state` (the data to save or the destinations)."""
    return [Fragment.slice_of(n, state[n], o, k) for n, o, k in ranges]


def zeros_like_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: torch.zeros_like(t) for n, t in state.items()}


def assert_ranges_equal(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], ranges: list[Range]
) -> None:
    """The covered ranges match exactly; everything outside them is still zero."""
    covered = {n: torch.zeros(t.numel(), dtype=torch.bool) for n, t in got.items()}
    for n, o, k in ranges:
        g, w = got[n].reshape(-1)[o : o + k], want[n].reshape(-1)[o : o + k]
        assert torch.equal(g, w), f"{n}[{o}:{o + k}] differs"
        covered[n][o : o + k] = True
    for n, t in got.items():
        assert not t.reshape(-1)[~covered[n]].any(), f"{n}: data outside the wanted ranges"
