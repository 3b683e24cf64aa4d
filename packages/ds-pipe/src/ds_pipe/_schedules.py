"""Pure functions that produce schedules: compute order per rank, then a lowering pass.

Each generator decides only the order of forward and backward actions on every rank
(``_compute_orders``); ``lower`` then inserts the sends and receives between them. The runtime
posts the communication between two compute actions as one batch, so lowering puts the sends
produced by the previous compute and the receives needed by the next one side by side: this
is what turns, e.g., 1F1B's "send activation / receive gradient" into one fused exchange and
avoids the rendezvous deadlock of posting them separately.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ds_pipe._schedule_ir import Action, ActionKind, Schedule

F = ActionKind.FORWARD
B = ActionKind.BACKWARD


class ScheduleConfigError(ValueError):
    """A schedule was requested with impossible sizes (names the argument and the fix)."""


def _check_sizes(num_ranks: int, num_micro_batches: int, num_chunks: int) -> None:
    if num_ranks < 1:
        raise ScheduleConfigError(f"num_ranks must be >= 1, got {num_ranks}")
    if num_micro_batches < 1:
        raise ScheduleConfigError(f"num_micro_batches must be >= 1, got {num_micro_batches}")
    if num_chunks < 1:
        raise ScheduleConfigError(
            f"num_chunks (virtual stages per rank) must be >= 1, got {num_chunks}"
        )


def _gpipe_order(p: int, m: int, v: int) -> list[list[Action]]:
    """All forwards (chunk by chunk), then all backwards in reverse chunk order."""
    orders = []
    for r in range(p):
        fwd = [Action(F, c * p + r, mb) for c in range(v) for mb in range(m)]
        bwd = [Action(B, c * p + r, mb) for c in reversed(range(v)) for mb in range(m)]
        orders.append(fwd + bwd)
    return orders


def _one_f_one_b_order(p: int, m: int) -> list[list[Action]]:
    """PipeDream-flush: p-r-1 warm-up forwards, then alternate one forward / one backward."""
    orders = []
    for r in range(p):
        warmup = min(p - r - 1, m)
        order = [Action(F, r, mb) for mb in range(warmup)]
        next_b = 0
        for mb in range(warmup, m):
            order.append(Action(F, r, mb))
            order.append(Action(B, r, next_b))
            next_b += 1
        order.extend(Action(B, r, mb) for mb in range(next_b, m))
        orders.append(order)
    return orders


def _interleaved_order(p: int, m: int, v: int) -> list[list[Action]]:
    """Megatron's interleaved 1F1B: micro-batches go through chunks in groups of ``p``.

    The k-th forward of a rank runs chunk ``(k mod p*v) // p`` on micro-batch
    ``(k // (p*v)) * p + k mod p``; backwards visit the chunks in reverse. The warm-up is long
    enough that the last chunk's first backward can start as soon as its input arrives.
    """
    total = m * v

    def chunk(k: int, backward: bool) -> int:
        c = (k % (p * v)) // p
        return v - 1 - c if backward else c

    def micro(k: int) -> int:
        return (k // (p * v)) * p + k % p

    orders = []
    for r in range(p):
        warmup = min((p - r - 1) * 2 + (v - 1) * p, total)
        order = [Action(F, chunk(k, False) * p + r, micro(k)) for k in range(warmup)]
        for i in range(total - warmup):
            k = warmup + i
            order.append(Action(F, chunk(k, False) * p + r, micro(k)))
            order.append(Action(B, chunk(i, True) * p + r, micro(i)))
        for i in range(total - warmup, total):
            order.append(Action(B, chunk(i, True) * p + r, micro(i)))
        orders.append(order)
    return orders


def _forward_only_order(p: int, m: int, v: int) -> list[list[Action]]:
    """Evaluation: forwards only, micro-batches in groups of ``p`` through the chunks."""
    if v == 1:
        return [[Action(F, r, mb) for mb in range(m)] for r in range(p)]
    orders = []
    for r in range(p):
        order = []
        for group in range(0, m, p):
            mbs = range(group, min(group + p, m))
            order.extend(Action(F, c * p + r, mb) for c in range(v) for mb in mbs)
        orders.append(order)
    return orders


def _consumer_message(action: Action) -> tuple[str, int, int] | None:
    """The message a compute action consumes from another stage, if any."""
    if action.kind is F:
        return ("act", action.stage - 1, action.micro_batch)
    return ("grad", action.stage + 1, action.micro_batch)


def _produced(action: Action, num_stages: int) -> Action | None:
    """The send a compute action produces, or None at the ends of the pipeline."""
    if action.kind is F and action.stage < num_stages - 1:
        return Action(ActionKind.SEND_ACT, action.stage, action.micro_batch)
    if action.kind is B and action.stage > 0:
        return Action(ActionKind.SEND_GRAD, action.stage, action.micro_batch)
    return None


def _needed(action: Action, num_stages: int) -> Action | None:
    """The receive a compute action needs, or None at the ends of the pipeline."""
    if action.kind is F and action.stage > 0:
        return Action(ActionKind.RECV_ACT, action.stage, action.micro_batch)
    if action.kind is B and action.stage < num_stages - 1:
        return Action(ActionKind.RECV_GRAD, action.stage, action.micro_batch)
    return None


def _buffered_times(
    orders: Sequence[Sequence[Action]], num_stages: int
) -> tuple[list[list[float]], dict[tuple[str, int, int], float]]:
    """Run the compute orders with unlimited buffering (forward 1, backward 2).

    Returns each rank's compute end times and the time every message is produced. This only
    decides where receives go; the result is then checked under strict rendezvous semantics.
    """
    p = len(orders)
    ends: list[list[float]] = [[] for _ in range(p)]
    produced: dict[tuple[str, int, int], float] = {}
    clock = [0.0] * p
    progress = True
    while progress:
        progress = False
        for r in range(p):
            while len(ends[r]) < len(orders[r]):
                a = orders[r][len(ends[r])]
                ready = 0.0
                if _needed(a, num_stages) is not None:
                    msg = _consumer_message(a)
                    if msg not in produced:
                        break
                    ready = produced[msg]
                elif a.kind is B:
                    # The last stage's backward follows its own forward (loss computed locally).
                    pass
                clock[r] = max(clock[r], ready) + (1.0 if a.kind is F else 2.0)
                ends[r].append(clock[r])
                send = _produced(a, num_stages)
                if send is not None:
                    produced[send.message()] = clock[r]
                progress = True
    stuck = [r for r in range(p) if len(ends[r]) < len(orders[r])]
    if stuck:
        raise ScheduleConfigError(
            f"compute orders cannot finish even with unlimited buffering (ranks {stuck} wait "
            "for inputs that are never produced); the schedule generator is wrong"
        )
    return ends, produced


def lower(
    name: str,
    compute_orders: Sequence[Sequence[Action]],
    num_chunks: int,
    num_micro_batches: int,
    forward_only: bool = False,
) -> Schedule:
    """Insert communication between compute actions and the end-of-step actions.

    Between two compute actions a rank has one communication "slot" (one batch). A send goes
    into the slot right after the compute that produced it. A receive goes into the earliest
    slot at which its message has already been produced in a buffered run of the same orders,
    and never later than the slot before its consumer: under rendezvous semantics (NCCL groups)
    the receiver must be posting when the sender is, and a receive posted only when needed
    would leave, e.g., looped/interleaved schedules waiting on each other forever. Receives
    from one sender keep the sender's order, because P2P matches messages by order.

    Stages on the same rank (only when there is one rank) hand tensors over in memory, so no
    communication is emitted for them.
    """
    p = len(compute_orders)
    num_stages = p * num_chunks
    slots: list[list[list[Action]]] = [[[] for _ in range(len(o) + 1)] for o in compute_orders]
    if p > 1:
        ends, produced = _buffered_times(compute_orders, num_stages)
        # receives per (sender rank, receiver rank): (produce time, slot, action)
        per_pair: dict[tuple[int, int], list[tuple[float, int, Action]]] = {}
        for r, order in enumerate(compute_orders):
            arrive = [0.0, *ends[r]]  # arrive[j]: when rank r reaches slot j
            for c, a in enumerate(order):
                send = _produced(a, num_stages)
                if send is not None:
                    slots[r][c + 1].append(send)
                recv = _needed(a, num_stages)
                if recv is None:
                    continue
                t = produced[recv.message()]
                slot = next((j for j in range(c + 1) if arrive[j] >= t), c)
                sender = (recv.peer_stage()) % p
                per_pair.setdefault((sender, r), []).append((t, slot, recv))
        for (_, r), recvs in per_pair.items():
            recvs.sort(key=lambda x: x[0])
            # A later message may not be received in an earlier slot than an earlier one.
            latest = None
            placed = []
            for t, slot, recv in reversed(recvs):
                latest = slot if latest is None else min(slot, latest)
                placed.append((latest, t, recv))
            for slot, _, recv in sorted(placed, key=lambda x: (x[0], x[1])):
                slots[r][slot].append(recv)
    programs = []
    for r, order in enumerate(compute_orders):
        program: list[Action] = []
        for c, a in enumerate(order):
            program.extend(_sort_batch(slots[r][c]))
            program.append(a)
        program.extend(_sort_batch(slots[r][len(order)]))
        if not forward_only:
            program.append(Action(ActionKind.REDUCE_GRADS))
            program.append(Action(ActionKind.OPTIMIZER_STEP))
        programs.append(tuple(program))
    return Schedule(
        name=name,
        num_ranks=p,
        num_chunks=num_chunks,
        num_micro_batches=num_micro_batches,
        programs=tuple(programs),
        forward_only=forward_only,
    )


def _sort_batch(batch: list[Action]) -> list[Action]:
    """Sends first (in production order), then receives (already in message order)."""
    return [a for a in batch if a.kind.is_send] + [a for a in batch if not a.kind.is_send]


def gpipe(num_ranks: int, num_micro_batches: int, num_chunks: int = 1) -> Schedule:
    """GPipe: all forwards, then all backwards (keeps every micro-batch's activations)."""
    _check_sizes(num_ranks, num_micro_batches, num_chunks)
    orders = _gpipe_order(num_ranks, num_micro_batches, num_chunks)
    return lower("gpipe", orders, num_chunks, num_micro_batches)


def one_f_one_b(num_ranks: int, num_micro_batches: int) -> Schedule:
    """1F1B (PipeDream-flush): GPipe's bubble with at most ``num_ranks`` micro-batches in flight."""
    _check_sizes(num_ranks, num_micro_batches, 1)
    orders = _one_f_one_b_order(num_ranks, num_micro_batches)
    return lower("1f1b", orders, 1, num_micro_batches)


def interleaved_1f1b(num_ranks: int, num_micro_batches: int, num_chunks: int) -> Schedule:
    """Interleaved 1F1B with ``num_chunks`` virtual stages per rank (bubble / num_chunks).

    Needs ``num_micro_batches`` to be a multiple of ``num_ranks`` so every group of ``num_ranks``
    micro-batches visits each chunk together.
    """
    _check_sizes(num_ranks, num_micro_batches, num_chunks)
    if num_chunks == 1:
        return one_f_one_b(num_ranks, num_micro_batches)
    if num_micro_batches % num_ranks != 0:
        raise ScheduleConfigError(
            f"interleaved 1F1B needs num_micro_batches ({num_micro_batches}) to be a multiple of "
            f"the number of pipeline ranks ({num_ranks}); change gradient accumulation steps "
            "or use schedule='1f1b'"
        )
    orders = _interleaved_order(num_ranks, num_micro_batches, num_chunks)
    return lower("interleaved_1f1b", orders, num_chunks, num_micro_batches)


def forward_only(num_ranks: int, num_micro_batches: int, num_chunks: int = 1) -> Schedule:
    """Evaluation schedule: forwards and activation sends only."""
    _check_sizes(num_ranks, num_micro_batches, num_chunks)
    orders = _forward_only_order(num_ranks, num_micro_batches, num_chunks)
    return lower("forward_only", orders, num_chunks, num_micro_batches, forward_only=True)


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved_1f1b": interleaved_1f1b,
}


def build_schedule(
    name: str, num_ranks: int, num_micro_batches: int, num_chunks: int = 1
) -> Schedule:
    """Build a training schedule by name (``gpipe``, ``1f1b``, ``interleaved_1f1b``)."""
    if name not in SCHEDULES:
        raise ScheduleConfigError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    if name == "1f1b":
        if num_chunks != 1:
            raise ScheduleConfigError(
                f"schedule '1f1b' runs one chunk per rank, got num_chunks={num_chunks}; "
                "use schedule='interleaved_1f1b' for virtual stages"
            )
        return one_f_one_b(num_ranks, num_micro_batches)
    return SCHEDULES[name](num_ranks, num_micro_batches, num_chunks)
