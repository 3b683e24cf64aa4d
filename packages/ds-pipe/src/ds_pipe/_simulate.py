"""Discrete-event simulation of a schedule under NCCL-like stream semantics.

Model: each rank runs its program in order. A communication batch is posted without blocking
the rank and joins the rank's communication queue; batches on one queue run one after another
(one NCCL stream per communicator), and a batch finishes when every operation in it has met
its partner, i.e. when the batch holding the matching operation is also at the head of its
rank's queue. A compute action waits for the batch that delivers its input; the end-of-step
reduction waits for all batches. The runtime executes exactly this (waits only for receives it
needs), so a schedule that finishes here cannot hang there, whatever the real timings are:
whether a deadlock exists depends only on the order of batches, not on their durations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ds_pipe._schedule_ir import Action, ActionKind, Schedule
from ds_pipe._validate import ScheduleError


@dataclass(frozen=True)
class CostModel:
    """Time per action. Defaults: the classic forward = 1, backward = 2, free communication.

    ``forward`` / ``backward`` are one number for every stage or a sequence indexed by
    (virtual) stage, e.g. per-stage times measured on a device.
    """

    forward: float | Sequence[float] = 1.0
    backward: float | Sequence[float] = 2.0
    message: float = 0.0
    reduce: float = 0.0
    step: float = 0.0

    def cost(self, action: Action) -> float:
        if action.kind is ActionKind.FORWARD:
            return _per_stage(self.forward, action.stage)
        if action.kind is ActionKind.BACKWARD:
            return _per_stage(self.backward, action.stage)
        if action.kind is ActionKind.REDUCE_GRADS:
            return self.reduce
        if action.kind is ActionKind.OPTIMIZER_STEP:
            return self.step
        return 0.0


def _per_stage(value: float | Sequence[float], stage: int) -> float:
    return float(value) if isinstance(value, (int, float)) else float(value[stage])


@dataclass(frozen=True)
class TimedAction:
    rank: int
    action: Action
    start: float
    end: float


@dataclass(frozen=True)
class SimulationResult:
    """What a schedule costs: makespan, per-rank busy time, bubble, activation memory."""

    makespan: float
    busy: tuple[float, ...]
    peak_in_flight: tuple[int, ...]
    """Per rank, the most micro-batch activations held at once (forward done, backward not)."""
    timeline: tuple[TimedAction, ...]

    @property
    def bubble_fraction(self) -> float:
        """Idle share of the pipeline's compute time: 1 - total busy / (ranks * makespan)."""
        if self.makespan == 0:
            return 0.0
        return 1.0 - sum(self.busy) / (len(self.busy) * self.makespan)


class DeadlockError(ScheduleError):
    """The simulated ranks stop with work left: the schedule would hang."""


@dataclass
class _Batch:
    rank: int
    actions: list[Action]
    posted: float
    start: float | None = None
    done: float | None = None


def first_received_micro_batch(schedule: Schedule) -> dict[int, int]:
    """For each receiving stage, the micro-batch of its first activation receive in the step."""
    first: dict[int, int] = {}
    for program in schedule.programs:
        for a in program:
            if a.kind is ActionKind.RECV_ACT and a.stage not in first:
                first[a.stage] = a.micro_batch
    return first


def simulate(schedule: Schedule, costs: CostModel | None = None) -> SimulationResult:
    """Run the schedule in simulated time; raise ``DeadlockError`` if it cannot finish."""
    costs = costs or CostModel()
    s = schedule
    programs = [s.batches(r) for r in range(s.num_ranks)]
    pc = [0] * s.num_ranks
    clock = [0.0] * s.num_ranks
    busy = [0.0] * s.num_ranks
    in_flight = [0] * s.num_ranks
    peak = [0] * s.num_ranks
    queues: list[list[_Batch]] = [[] for _ in range(s.num_ranks)]
    # (src rank, dst rank, message) -> the batch holding the send / the receive.
    sends: dict[tuple[int, int, tuple[str, int, int]], _Batch] = {}
    recvs: dict[tuple[int, int, tuple[str, int, int]], _Batch] = {}
    delivered_by: dict[tuple[int, Action], _Batch] = {}
    timeline: list[TimedAction] = []
    first_mb = first_received_micro_batch(s)
    announced: set[tuple[int, int, tuple[str, int, int]]] = set()

    def key(r: int, a: Action) -> tuple[int, int, tuple[str, int, int]]:
        peer = s.rank_of_stage(a.peer_stage())
        return (r, peer, a.message()) if a.kind.is_send else (peer, r, a.message())

    leftover: list[list[Action] | None] = [None] * s.num_ranks
    head = [0] * s.num_ranks  # first unfinished batch of each queue

    def post(r: int, ops: list[Action]) -> None:
        b = _Batch(r, ops, posted=clock[r])
        queues[r].append(b)
        for op in ops:
            (sends if op.kind.is_send else recvs)[key(r, op)] = b
            if not op.kind.is_send:
                consumer = (
                    ActionKind.FORWARD if op.kind is ActionKind.RECV_ACT else ActionKind.BACKWARD
                )
                delivered_by[(r, Action(consumer, op.stage, op.micro_batch))] = b

    def advance_queues() -> bool:
        moved = False
        for r in range(s.num_ranks):
            while head[r] < len(queues[r]) and queues[r][head[r]].done is not None:
                head[r] += 1
            for i in range(head[r], len(queues[r])):
                b = queues[r][i]
                if b.done is not None:
                    continue
                prev_done = queues[r][i - 1].done if i else 0.0
                if prev_done is None:
                    break
                if b.start is None:
                    b.start = max(b.posted, prev_done)
                    moved = True
                match_times = []
                for a in b.actions:
                    other = (recvs if a.kind.is_send else sends).get(key(r, a))
                    if other is None or other.start is None:
                        break
                    match_times.append(max(b.start, other.start) + costs.message)
                else:
                    b.done = max([b.start, *match_times])
                    for a in b.actions:
                        timeline.append(TimedAction(r, a, b.start, b.done))
                    moved = True
                    continue
                break
        return moved

    progress = True
    while progress:
        progress = advance_queues()
        for r in range(s.num_ranks):
            while pc[r] < len(programs[r]):
                batch = programs[r][pc[r]]
                a = batch[0]
                if a.kind.is_comm:
                    # Shape negotiation: the first activation of a channel in a step comes with
                    # its metadata, which the receiver needs before it can post the receive. The
                    # runtime announces the batch's sends at once, posts what it can (sends and
                    # receives of known shape) as one batch, then blocks until the missing
                    # metadata arrives and posts the remaining receives as a second batch.
                    announced.update(key(r, op) for op in batch if op.kind.is_send)
                    todo = leftover[r] if leftover[r] is not None else batch
                    missing = [
                        op
                        for op in todo
                        if op.kind is ActionKind.RECV_ACT
                        and op.micro_batch == first_mb[op.stage]
                        and key(r, op) not in announced
                    ]
                    if missing:
                        if leftover[r] is None:
                            ready = [op for op in todo if op not in missing]
                            if ready:
                                post(r, ready)
                                progress = True
                            leftover[r] = missing
                        break
                    post(r, todo)
                    leftover[r] = None
                    pc[r] += 1
                    progress = True
                    continue
                if a.kind.is_compute:
                    feeder = delivered_by.get((r, a))
                    if feeder is not None and feeder.done is None:
                        break
                    ready = feeder.done if feeder is not None else 0.0
                else:  # reduce / step wait for every outstanding transfer of the rank
                    if any(b.done is None for b in queues[r]):
                        break
                    ready = max((b.done for b in queues[r] if b.done is not None), default=0.0)
                start = max(clock[r], ready)
                clock[r] = start + costs.cost(a)
                if a.kind.is_compute:
                    busy[r] += clock[r] - start
                    in_flight[r] += 1 if a.kind is ActionKind.FORWARD else -1
                    peak[r] = max(peak[r], in_flight[r])
                timeline.append(TimedAction(r, a, start, clock[r]))
                pc[r] += 1
                progress = True
        progress = advance_queues() or progress
    stuck = [r for r in range(s.num_ranks) if pc[r] < len(programs[r])]
    unfinished = [b for q in queues for b in q if b.done is None]
    if stuck or unfinished:
        problems = [
            f"deadlock: rank {r} waits before " + " ".join(str(a) for a in programs[r][pc[r]])
            for r in stuck
        ] + [
            f"deadlock: rank {b.rank} never completes [" + " ".join(str(a) for a in b.actions) + "]"
            for b in unfinished[:8]
        ]
        raise DeadlockError(s.name, problems)
    end = [max([clock[r], *(b.done or 0.0 for b in queues[r])]) for r in range(s.num_ranks)]
    return SimulationResult(
        makespan=max(end) if end else 0.0,
        busy=tuple(busy),
        peak_in_flight=tuple(peak),
        timeline=tuple(sorted(timeline, key=lambda t: (t.start, t.rank))),
    )
