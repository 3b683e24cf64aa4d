"""The op counter: a TorchDispatchMode that charges every counted ATen call to a bucket.

Nothing global is patched: the mode is pushed on this thread's dispatch-mode stack while a
profile runs and popped when it stops (the autograd engine carries the stack into its worker
threads, so backward kernels are seen too). Attribution to modules comes from the profiler's
forward hooks, which push and pop the module being run; a call made while no module is running
and outside backward (a loss computed outside the model) is not part of the model's forward and
is charged to nobody, as in DeepSpeed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ds_profile._ops import FORMULAS, bind


class Phase(enum.Enum):
    """Which pass a kernel belongs to (decided per call, from the autograd engine's state)."""

    FORWARD = "forward"
    BACKWARD = "backward"


@dataclass
class Tally:
    """FLOPs and MACs charged to one module (its own calls, not its children's)."""

    flops: int = 0
    macs: int = 0


def _in_backward() -> bool:
    # -1 outside a backward pass: the graph task id is set only while the engine runs one
    return torch._C._current_graph_task_id() != -1


# eq=False: a mode is compared (and may be hashed) by identity on torch's mode stack
@dataclass(eq=False)
class OpCounter(TorchDispatchMode):
    """Counts FLOPs/MACs of every ATen call while active.

    ``stack`` holds the module tallies of the forward calls now running (the profiler's hooks
    push and pop); ``backward`` collects every backward kernel; ``per_op`` keeps a total per
    operator for tests and for the report.
    """

    stack: list[Tally] = field(default_factory=list)
    backward: Tally = field(default_factory=Tally)
    per_op: dict[str, Tally] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:  # fmt: skip
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = FORMULAS.get(func.overloadpacket)
        if formula is None:
            return out
        if _in_backward():
            target = self.backward
        elif self.stack:
            target = self.stack[-1]
        else:
            return out
        flops, macs = formula(bind(func, args, kwargs), out[0] if isinstance(out, tuple) else out)
        target.flops += flops
        target.macs += macs
        op = self.per_op.setdefault(str(func.overloadpacket), Tally())
        op.flops += flops
        op.macs += macs
        return out
