"""Static checks of a schedule: every rule a runtime would otherwise discover as a hang.

The checks are structural (who computes what, in which order, which message goes where); the
dynamic check (no deadlock under batched rendezvous) is the simulator's job.
"""

from __future__ import annotations

from collections import defaultdict

from ds_pipe._schedule_ir import Action, ActionKind, Schedule

F, B = ActionKind.FORWARD, ActionKind.BACKWARD


class ScheduleError(ValueError):
    """A schedule breaks a rule; ``problems`` lists every violation found."""

    def __init__(self, schedule_name: str, problems: list[str]) -> None:
        self.problems = problems
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"schedule {schedule_name!r} is invalid:\n  {shown}{more}")


def _check_ownership(s: Schedule, problems: list[str]) -> None:
    for r, program in enumerate(s.programs):
        for i, a in enumerate(program):
            if a.stage < 0:
                if a.kind.is_compute or a.kind.is_comm:
                    problems.append(f"rank {r} action {i} ({a}) has no stage")
                continue
            if not 0 <= a.stage < s.num_stages:
                problems.append(f"rank {r} action {i} ({a}): stage out of range")
            elif s.rank_of_stage(a.stage) != r:
                problems.append(
                    f"rank {r} action {i} ({a}): stage {a.stage} lives on rank "
                    f"{s.rank_of_stage(a.stage)}"
                )
            if not 0 <= a.micro_batch < s.num_micro_batches:
                problems.append(f"rank {r} action {i} ({a}): micro-batch out of range")
            if a.kind.is_comm and 0 <= a.stage < s.num_stages:
                peer = a.peer_stage()
                if not 0 <= peer < s.num_stages:
                    problems.append(f"rank {r} action {i} ({a}): peer stage {peer} does not exist")
                elif s.rank_of_stage(peer) == r:
                    problems.append(f"rank {r} action {i} ({a}): communicates with itself")


def _positions(program: tuple[Action, ...]) -> dict[Action, list[int]]:
    pos: dict[Action, list[int]] = defaultdict(list)
    for i, a in enumerate(program):
        pos[a].append(i)
    return pos


def _check_compute_and_data_flow(s: Schedule, problems: list[str]) -> None:
    """Exactly one F (and B) per stage and micro-batch; inputs arrive before they are used."""
    for r, program in enumerate(s.programs):
        pos = _positions(program)
        for a, where in pos.items():
            if len(where) > 1:
                problems.append(f"rank {r}: {a} appears {len(where)} times")
        for stage in s.stages_of_rank(r):
            for mb in range(s.num_micro_batches):
                f = pos.get(Action(F, stage, mb))
                b = pos.get(Action(B, stage, mb))
                if not f:
                    problems.append(f"rank {r}: forward of stage {stage} mb {mb} is missing")
                    continue
                if s.forward_only:
                    if b:
                        problems.append(
                            f"rank {r}: forward-only schedule has {b and program[b[0]]}"
                        )
                elif not b:
                    problems.append(f"rank {r}: backward of stage {stage} mb {mb} is missing")
                elif b[0] < f[0]:
                    problems.append(f"rank {r}: backward {stage}.{mb} runs before its forward")
                _check_neighbours(s, r, pos, stage, mb, f[0], b[0] if b else None, problems)


def _check_neighbours(
    s: Schedule,
    r: int,
    pos: dict[Action, list[int]],
    stage: int,
    mb: int,
    f: int,
    b: int | None,
    problems: list[str],
) -> None:
    remote = s.num_ranks > 1
    # (needed?, action, must come before index / after index)
    rules: list[tuple[bool, Action, str, int | None]] = [
        (remote and stage > 0, Action(ActionKind.RECV_ACT, stage, mb), "before", f),
        (remote and stage < s.num_stages - 1, Action(ActionKind.SEND_ACT, stage, mb), "after", f),
    ]
    if not s.forward_only:
        rules += [
            (
                remote and stage < s.num_stages - 1,
                Action(ActionKind.RECV_GRAD, stage, mb),
                "before",
                b,
            ),
            (remote and stage > 0, Action(ActionKind.SEND_GRAD, stage, mb), "after", b),
        ]
    for needed, action, side, anchor in rules:
        where = pos.get(action)
        if not needed:
            if where:
                problems.append(
                    f"rank {r}: {action} is not needed (stage has no remote peer there)"
                )
            continue
        if not where:
            problems.append(f"rank {r}: {action} is missing")
        elif anchor is not None and side == "before" and where[0] > anchor:
            problems.append(f"rank {r}: {action} comes after the compute that needs it")
        elif anchor is not None and side == "after" and where[0] < anchor:
            problems.append(f"rank {r}: {action} comes before the compute that produces it")


def _check_message_order(s: Schedule, problems: list[str]) -> None:
    """P2P matches by order per (sender, receiver): both sides must list the same messages."""
    sent: dict[tuple[int, int], list[tuple[str, int, int]]] = defaultdict(list)
    received: dict[tuple[int, int], list[tuple[str, int, int]]] = defaultdict(list)
    for r, program in enumerate(s.programs):
        for a in program:
            if not a.kind.is_comm or not 0 <= a.peer_stage() < s.num_stages:
                continue
            peer = s.rank_of_stage(a.peer_stage())
            if a.kind.is_send:
                sent[(r, peer)].append(a.message())
            else:
                received[(peer, r)].append(a.message())
    for pair in sorted(set(sent) | set(received)):
        if sent[pair] != received[pair]:
            src, dst = pair
            first = next(
                (i for i, (x, y) in enumerate(zip(sent[pair], received[pair])) if x != y),
                min(len(sent[pair]), len(received[pair])),
            )
            problems.append(
                f"messages rank {src} -> rank {dst} are sent and received in different orders "
                f"(first difference at message {first}: sent "
                f"{sent[pair][first : first + 1]}, received {received[pair][first : first + 1]})"
            )


def _check_step_tail(s: Schedule, problems: list[str]) -> None:
    for r, program in enumerate(s.programs):
        kinds = [a.kind for a in program]
        n_reduce = kinds.count(ActionKind.REDUCE_GRADS)
        n_step = kinds.count(ActionKind.OPTIMIZER_STEP)
        if s.forward_only:
            if n_reduce or n_step:
                problems.append(f"rank {r}: forward-only schedule reduces gradients or steps")
            continue
        if n_reduce != 1 or n_step != 1:
            problems.append(f"rank {r}: needs exactly one REDUCE_GRADS and one OPTIMIZER_STEP")
            continue
        i_reduce, i_step = (
            kinds.index(ActionKind.REDUCE_GRADS),
            kinds.index(ActionKind.OPTIMIZER_STEP),
        )
        last_b = max((i for i, k in enumerate(kinds) if k is B), default=-1)
        if not last_b < i_reduce < i_step:
            problems.append(
                f"rank {r}: gradients must be reduced after the last backward and before the step"
            )


def validate(schedule: Schedule) -> None:
    """Raise ``ScheduleError`` listing every rule the schedule breaks; return None if valid."""
    s = schedule
    problems: list[str] = []
    if len(s.programs) != s.num_ranks:
        problems.append(f"{len(s.programs)} programs for {s.num_ranks} ranks")
        raise ScheduleError(s.name, problems)
    _check_ownership(s, problems)
    if not problems:
        _check_compute_and_data_flow(s, problems)
        _check_message_order(s, problems)
        _check_step_tail(s, problems)
    if problems:
        raise ScheduleError(s.name, problems)
