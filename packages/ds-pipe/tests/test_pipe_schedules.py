"""Tier 1: schedules are validated and simulated in one process."""

from __future__ import annotations

import pytest

from ds_pipe import (
    Action,
    ActionKind,
    CostModel,
    DeadlockError,
    Schedule,
    ScheduleConfigError,
    ScheduleError,
    build_schedule,
    forward_only,
    gpipe,
    interleaved_1f1b,
    one_f_one_b,
    simulate,
    validate,
)

F, B = ActionKind.FORWARD, ActionKind.BACKWARD
RANKS = [1, 2, 3, 4, 8]
MICRO = [1, 2, 3, 4, 8, 12, 16]


def _all_schedules():
    for p in RANKS:
        for m in MICRO[:5]:
            yield one_f_one_b(p, m)
            yield forward_only(p, m)
            for v in (1, 2, 3):
                yield gpipe(p, m, v)
                if m % p == 0:
                    yield interleaved_1f1b(p, m, v)
                    yield forward_only(p, m, v)


def test_every_generated_schedule_validates_and_finishes():
    count = 0
    for s in _all_schedules():
        validate(s)
        result = simulate(s)
        assert result.makespan > 0
        for r in range(s.num_ranks):
            n_compute = sum(1 for a in s.programs[r] if a.kind.is_compute)
            per_mb = 1 if s.forward_only else 2
            assert n_compute == per_mb * s.num_chunks * s.num_micro_batches
        count += 1
    assert count > 100


@pytest.mark.parametrize("p", RANKS)
@pytest.mark.parametrize("m", MICRO)
@pytest.mark.parametrize("costs", [CostModel(1, 2), CostModel(1, 1), CostModel(2, 3)])
def test_1f1b_bubble_is_p_minus_1_over_m_plus_p_minus_1(p, m, costs):
    result = simulate(one_f_one_b(p, m), costs)
    assert result.bubble_fraction == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)
    assert result.makespan == pytest.approx((m + p - 1) * (costs.forward + costs.backward))


@pytest.mark.parametrize("p", RANKS)
@pytest.mark.parametrize("m", MICRO)
def test_1f1b_holds_at_most_p_minus_rank_micro_batches_but_gpipe_holds_all(p, m):
    assert simulate(one_f_one_b(p, m)).peak_in_flight == tuple(min(p - r, m) for r in range(p))
    assert simulate(gpipe(p, m)).peak_in_flight == (m,) * p
    assert simulate(gpipe(p, m)).bubble_fraction == pytest.approx((p - 1) / (m + p - 1))


@pytest.mark.parametrize("p", [2, 3, 4, 8])
@pytest.mark.parametrize("v", [2, 3, 4])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_interleaved_bubble_shrinks_by_the_number_of_chunks(p, v, groups):
    m = p * groups
    result = simulate(interleaved_1f1b(p, m, v))
    assert result.bubble_fraction == pytest.approx((p - 1) / (v * m + p - 1), abs=1e-12)
    assert result.bubble_fraction < simulate(one_f_one_b(p, m)).bubble_fraction


def test_interleaved_rejects_micro_batches_not_multiple_of_ranks():
    with pytest.raises(ScheduleConfigError, match="multiple of the number of pipeline ranks"):
        interleaved_1f1b(4, 6, 2)
    with pytest.raises(ScheduleConfigError, match="unknown schedule"):
        build_schedule("zero-bubble", 2, 4)
    with pytest.raises(ScheduleConfigError, match="interleaved_1f1b"):
        build_schedule("1f1b", 2, 4, 2)
    with pytest.raises(ScheduleConfigError, match="num_micro_batches"):
        one_f_one_b(2, 0)


def test_1f1b_program_on_two_ranks_fuses_send_and_receive():
    s = one_f_one_b(2, 3)
    assert s.format().splitlines() == [
        "rank 0: F0.0 [SA0.0] F0.1 [SA0.1 RG0.0] B0.0 F0.2 [SA0.2 RG0.1] B0.1 [RG0.2] B0.2 R O",
        # the next activation is received while the backward runs (posted before it)
        "rank 1: [RA1.0] F1.0 [RA1.1] B1.0 [SG1.0] F1.1 B1.1 [SG1.1 RA1.2] F1.2 B1.2 [SG1.2] R O",
    ]


def _schedule(programs, p=2, m=2, forward_only_=False):
    parsed = []
    kinds = {k.value: k for k in ActionKind}
    for prog in programs:
        actions = []
        for tok in prog.split():
            if tok in ("R", "O"):
                actions.append(Action(kinds[tok]))
                continue
            kind = kinds[tok.rstrip("0123456789.")]
            stage, mb = tok[len(kind.value) :].split(".")
            actions.append(Action(kind, int(stage), int(mb)))
        parsed.append(tuple(actions))
    return Schedule("hand", p, 1, m, tuple(parsed), forward_only=forward_only_)


GOOD = [
    "F0.0 SA0.0 F0.1 SA0.1 RG0.0 B0.0 RG0.1 B0.1 R O",
    "RA1.0 F1.0 B1.0 SG1.0 RA1.1 F1.1 B1.1 SG1.1 R O",
]


def test_hand_written_schedule_is_accepted():
    validate(_schedule(GOOD))
    simulate(_schedule(GOOD))


@pytest.mark.parametrize(
    "programs, problem",
    [
        (
            [GOOD[0].replace("RG0.0 B0.0 RG0.1 B0.1", "RG0.1 B0.1 RG0.0 B0.0"), GOOD[1]],
            "different orders",
        ),
        ([GOOD[0], GOOD[1].replace("RA1.1 ", "")], "RA1.1 is missing"),
        ([GOOD[0].replace("RG0.0 B0.0", "B0.0 RG0.0"), GOOD[1]], "after the compute that needs it"),
        (
            [GOOD[0], GOOD[1].replace("B1.0 SG1.0", "SG1.0 B1.0")],
            "before the compute that produces",
        ),
        ([GOOD[0].replace("F0.1 SA0.1", "B0.1 SA0.1"), GOOD[1]], "appears 2 times"),
        ([GOOD[0] + " F1.0", GOOD[1]], "lives on rank 1"),
        ([GOOD[0].replace(" R O", " O R"), GOOD[1]], "before the step"),
        (
            [GOOD[0], GOOD[1].replace("F1.0 B1.0", "B1.0 F1.0")],
            "backward 1.0 runs before its forward",
        ),
    ],
)
def test_validator_names_the_broken_rule(programs, problem):
    with pytest.raises(ScheduleError, match=problem):
        validate(_schedule(programs))


def test_simulator_finds_a_rendezvous_deadlock_the_validator_cannot_see():
    # Rank 0 waits for gradient 0 alone while rank 1 first wants activation 1, which rank 0
    # only sends in a later batch: each side waits for the other.
    programs = [
        "F0.0 SA0.0 F0.1 RG0.0 B0.0 SA0.1 RG0.1 B0.1 R O",
        "RA1.0 F1.0 RA1.1 F1.1 B1.0 SG1.0 B1.1 SG1.1 R O",
    ]
    s = _schedule(programs)
    validate(s)
    with pytest.raises(DeadlockError, match="deadlock"):
        simulate(s)


def test_forward_only_has_no_backward_and_no_step():
    s = forward_only(3, 4)
    validate(s)
    assert all(a.kind not in (B, ActionKind.REDUCE_GRADS) for prog in s.programs for a in prog)
    assert simulate(s).makespan == pytest.approx(4 + 3 - 1)
