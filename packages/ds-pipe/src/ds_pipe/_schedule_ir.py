"""The schedule IR: small immutable actions, grouped per pipeline rank.

A schedule is data, not code: pure functions in ``_schedules`` produce it, ``_validate`` and
``_simulate`` check it in one process, and ``_runtime`` executes it. Keeping the three apart is
what lets every schedule be tested for deadlocks and bubble size without a process group.

Stages are *virtual*: with ``num_chunks`` model chunks per rank there are
``num_ranks * num_chunks`` stages and stage ``s`` lives on rank ``s % num_ranks`` as chunk
``s // num_ranks`` (the Megatron interleaved placement; with one chunk per rank it is the plain
"stage == rank" placement).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class ActionKind(enum.Enum):
    """What one step of a rank's program does."""

    FORWARD = "F"
    """Run stage ``stage`` on micro-batch ``micro_batch``; keeps its activations for backward."""
    BACKWARD = "B"
    """Back-propagate micro-batch ``micro_batch`` through stage ``stage``; frees activations."""
    SEND_ACT = "SA"
    """Send the output of stage ``stage`` (micro-batch ``micro_batch``) to stage ``stage + 1``."""
    RECV_ACT = "RA"
    """Receive the input of stage ``stage`` (micro-batch ``micro_batch``) from ``stage - 1``."""
    SEND_GRAD = "SG"
    """Send the gradient of stage ``stage``'s input to stage ``stage - 1``."""
    RECV_GRAD = "RG"
    """Receive the gradient of stage ``stage``'s output from stage ``stage + 1``."""
    REDUCE_GRADS = "R"
    """All-reduce gradients of tied weights and across data-parallel replicas."""
    OPTIMIZER_STEP = "O"
    """Step the optimizer of this rank's parameters."""

    @property
    def is_compute(self) -> bool:
        return self in (ActionKind.FORWARD, ActionKind.BACKWARD)

    @property
    def is_comm(self) -> bool:
        return self in _COMM_KINDS

    @property
    def is_send(self) -> bool:
        return self in (ActionKind.SEND_ACT, ActionKind.SEND_GRAD)


_COMM_KINDS = frozenset(
    {ActionKind.SEND_ACT, ActionKind.RECV_ACT, ActionKind.SEND_GRAD, ActionKind.RECV_GRAD}
)


@dataclass(frozen=True)
class Action:
    """One step of a rank's program. ``stage``/``micro_batch`` are -1 for whole-step actions."""

    kind: ActionKind
    stage: int = -1
    micro_batch: int = -1

    def peer_stage(self) -> int:
        """The stage on the other end of a communication action."""
        if self.kind in (ActionKind.SEND_ACT, ActionKind.RECV_GRAD):
            return self.stage + 1
        if self.kind in (ActionKind.RECV_ACT, ActionKind.SEND_GRAD):
            return self.stage - 1
        raise ValueError(f"{self} is not a communication action")

    def message(self) -> tuple[str, int, int]:
        """The message a communication action carries: (channel, producer stage, micro-batch).

        A send and the receive that must consume it have the same message, which is how the
        validator and simulator pair them up.
        """
        if self.kind in (ActionKind.SEND_ACT, ActionKind.SEND_GRAD):
            channel = "act" if self.kind is ActionKind.SEND_ACT else "grad"
            return (channel, self.stage, self.micro_batch)
        if self.kind in (ActionKind.RECV_ACT, ActionKind.RECV_GRAD):
            channel = "act" if self.kind is ActionKind.RECV_ACT else "grad"
            return (channel, self.peer_stage(), self.micro_batch)
        raise ValueError(f"{self} is not a communication action")

    def __str__(self) -> str:
        if self.stage < 0:
            return self.kind.value
        return f"{self.kind.value}{self.stage}.{self.micro_batch}"


@dataclass(frozen=True)
class Schedule:
    """Per-rank programs for one training (or evaluation) step of a pipeline.

    ``programs[r]`` is the ordered tuple of actions rank ``r`` executes. Consecutive
    communication actions form one batch that the runtime posts together (one
    ``batch_isend_irecv``), so a schedule's batching is part of the data and is checked by the
    simulator.
    """

    name: str
    num_ranks: int
    num_chunks: int
    num_micro_batches: int
    programs: tuple[tuple[Action, ...], ...]
    forward_only: bool = False
    meta: dict[str, object] = field(default_factory=dict, compare=False)

    @property
    def num_stages(self) -> int:
        return self.num_ranks * self.num_chunks

    def rank_of_stage(self, stage: int) -> int:
        return stage % self.num_ranks

    def chunk_of_stage(self, stage: int) -> int:
        return stage // self.num_ranks

    def stages_of_rank(self, rank: int) -> list[int]:
        return [c * self.num_ranks + rank for c in range(self.num_chunks)]

    def batches(self, rank: int) -> list[list[Action]]:
        """The rank's program split into steps: a lone non-comm action, or a comm batch."""
        out: list[list[Action]] = []
        for action in self.programs[rank]:
            if action.kind.is_comm and out and out[-1][0].kind.is_comm:
                out[-1].append(action)
            else:
                out.append([action])
        return out

    def format(self) -> str:
        """A readable table, one line per rank, comm batches in brackets."""
        lines = []
        for r in range(self.num_ranks):
            parts = []
            for batch in self.batches(r):
                text = " ".join(str(a) for a in batch)
                parts.append(f"[{text}]" if batch[0].kind.is_comm else text)
            lines.append(f"rank {r}: " + " ".join(parts))
        return "\n".join(lines)
