"""Per-step module call counts, to name the module when control flow differs across ranks.

ZeRO-3 gathers a module's parameters with a collective each time the module runs; a module
that runs a different number of times on two ranks makes their collectives disagree, which
hangs (or, with equal bucket sizes, mixes parameters). Counting calls with forward pre-hooks is
cheap (one dict increment per module call) and needs no communication; the counts are compared
across ranks by the watchdog (through the store, when ranks are stuck) and at step boundaries.
"""

from __future__ import annotations

import hashlib
from collections import Counter

from torch import nn
from torch.utils.hooks import RemovableHandle


class CallCounter:
    """Counts forward calls of every module that holds parameters, since the last reset."""

    def __init__(self, model: nn.Module) -> None:
        self.counts: Counter[str] = Counter()
        self._handles: list[RemovableHandle] = []
        for name, module in model.named_modules():
            if any(True for _ in module.parameters()):
                self._handles.append(module.register_forward_pre_hook(self._hook(name or "<root>")))

    def _hook(self, name: str):  # noqa: ANN202 - a hook closure
        counts = self.counts

        def pre_forward(module: nn.Module, args: object) -> None:
            counts[name] += 1

        return pre_forward

    def reset(self) -> None:
        self.counts.clear()

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)

    def fingerprint(self) -> int:
        """63-bit hash of the counts (order-independent), for a cheap cross-rank comparison."""
        text = ";".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def explain_divergence(per_rank: dict[int, dict[str, int]], limit: int = 5) -> str | None:
    """A sentence naming the modules whose call counts differ across ranks, or None."""
    names = sorted({n for c in per_rank.values() for n in c})
    differ = {n for n in names if len({c.get(n, 0) for c in per_rank.values()}) > 1}
    lines = []
    for name in names:
        parts = name.split(".")
        # name the outermost module that differs: its submodules differ because it does
        if name not in differ or any(".".join(parts[:i]) in differ for i in range(1, len(parts))):
            continue
        by_rank = {r: c.get(name, 0) for r, c in sorted(per_rank.items())}
        runs = ", ".join(f"{n} time(s) on rank {r}" for r, n in by_rank.items())
        lines.append(f"module '{name}' ran {runs}")
    if not lines:
        return None
    more = f" (and {len(lines) - limit} more)" if len(lines) > limit else ""
    return (
        "control flow differs across ranks in this step: "
        + "; ".join(lines[:limit])
        + more
        + ". ZeRO-3 gathers a module's parameters with a collective on every call, so every "
        "rank must call each module the same number of times per step (move the "
        "rank-dependent branch outside the model, or run the same modules on every rank)"
    )
