"""Per-step schedule values equal DeepSpeed's: curriculum, random-LTD, progressive layer drop."""

from __future__ import annotations

import copy
import json

import pytest
from _reference import real_deepspeed, reference

from ds_data import CurriculumScheduler, DataConfigError, ProgressiveLayerDrop, RandomLTDScheduler

CURRICULA = sorted(reference()["curriculum"])


@pytest.mark.parametrize("name", CURRICULA)
def test_curriculum_matches_recorded_deepspeed(name):
    case = reference()["curriculum"][name]
    ours = CurriculumScheduler(copy.deepcopy(case["config"]))
    assert [ours.update_difficulty(s) for s in range(len(case["update"]))] == case["update"]
    assert [CurriculumScheduler(case["config"]).get_difficulty(s)
            for s in range(len(case["get"]))] == case["get"]  # fmt: skip


@pytest.mark.parametrize("name", CURRICULA)
def test_curriculum_matches_installed_deepspeed(name):
    theirs_cls = real_deepspeed("deepspeed.runtime.data_pipeline.curriculum_scheduler",
                                "CurriculumScheduler", CurriculumScheduler)  # fmt: skip
    cfg = reference()["curriculum"][name]["config"]
    theirs, ours = theirs_cls(copy.deepcopy(cfg)), CurriculumScheduler(copy.deepcopy(cfg))
    for step in range(0, 700, 3):
        assert ours.update_difficulty(step) == theirs.update_difficulty(step), step


def test_curriculum_custom_and_state_roundtrip():
    sched = CurriculumScheduler(
        {"min_difficulty": 2, "max_difficulty": 10, "schedule_type": "custom"}
    )
    with pytest.raises(DataConfigError, match="set_custom_get_difficulty"):
        sched.update_difficulty(1)
    sched.set_custom_get_difficulty(lambda step: min(2 + step, 10))
    assert [sched.update_difficulty(s) for s in range(12)] == [
        2,
        3,
        4,
        5,
        6,
        7,
        8,
        9,
        10,
        10,
        10,
        10,
    ]
    cfg = reference()["curriculum"]["root2"]["config"]
    a = CurriculumScheduler(cfg)
    for step in range(100):
        a.update_difficulty(step)
    b = CurriculumScheduler(cfg)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # JSON, no pickle
    assert [a.update_difficulty(s) for s in range(100, 400)] == [
        b.update_difficulty(s) for s in range(100, 400)
    ]


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"max_difficulty": 4, "schedule_type": "fixed_linear"}, "min_difficulty"),
        ({"min_difficulty": 1, "max_difficulty": 4, "schedule_type": "fixed_cubic"}, "fixed_cubic"),
        (
            {
                "min_difficulty": 1,
                "max_difficulty": 4,
                "schedule_type": "fixed_linear",
                "schedule_config": {"difficulty_step": 8},
            },
            "total_curriculum_step",
        ),  # fmt: skip
        (
            {
                "min_difficulty": 1,
                "max_difficulty": 4,
                "schedule_type": "fixed_root",
                "schedule_config": {"total_curriculum_step": 8, "difficulty_step": 8},
            },
            "root_degree",
        ),  # fmt: skip
        (
            {
                "min_difficulty": 1,
                "max_difficulty": 4,
                "schedule_type": "fixed_discrete",
                "schedule_config": {"difficulty": [1, 2], "max_step": [3, 4]},
            },
            "one entry more",
        ),  # fmt: skip
    ],
)
def test_curriculum_bad_config_names_the_key(cfg, match):
    with pytest.raises(DataConfigError, match=match):
        CurriculumScheduler(cfg)


def _run_ltd(cls, cfg, steps):
    sched = cls(copy.deepcopy(cfg))
    seqs, consumed = [], []
    for step in range(steps):
        sched.update_seq(step)
        sched.update_seq(step)
        seqs.append(sched.get_current_seq())
        consumed.append(sched.state["consumed_layer_tokens"])
    return sched, seqs, consumed


def test_random_ltd_schedule_matches_recorded_deepspeed():
    case = reference()["random_ltd"]
    sched, seqs, consumed = _run_ltd(RandomLTDScheduler, case["config"], len(case["seq"]))
    assert seqs == case["seq"] and consumed == case["consumed"]
    assert sched.state_dict() == case["state_dict"]


def test_random_ltd_schedule_matches_installed_deepspeed():
    theirs = real_deepspeed("deepspeed.runtime.data_pipeline.data_routing.scheduler",
                            "RandomLTDScheduler", RandomLTDScheduler)  # fmt: skip
    cfg = reference()["random_ltd"]["config"]
    _, seq_a, con_a = _run_ltd(RandomLTDScheduler, cfg, 300)
    _, seq_b, con_b = _run_ltd(theirs, cfg, 300)
    assert seq_a == seq_b and con_a == con_b


def test_random_ltd_refuses_what_deepspeed_does_not_implement():
    cfg = copy.deepcopy(reference()["random_ltd"]["config"])
    cfg["layer_token_lr_schedule"] = {"enabled": True}
    with pytest.raises(DataConfigError, match="layer_token_lr_schedule"):
        RandomLTDScheduler(cfg)
    cfg = copy.deepcopy(reference()["random_ltd"]["config"])
    cfg["random_ltd_schedule"]["schedule_type"] = "fixed_root"
    with pytest.raises(DataConfigError, match="fixed_linear"):
        RandomLTDScheduler(cfg)


@pytest.mark.parametrize("index", [0, 1])
def test_pld_matches_recorded_deepspeed(index):
    case = reference()["pld"][index]
    pld = ProgressiveLayerDrop(**case["config"])
    assert pld.get_state() == {"progressive_layer_drop": True, "pld_theta": 1.0}
    got = []
    for step in case["steps"]:
        pld.update_state(step)
        got.append(pld.get_theta())
    assert got == case["theta"]  # bit-for-bit


def test_pld_matches_installed_deepspeed():
    theirs_cls = real_deepspeed("deepspeed.runtime.progressive_layer_drop", "ProgressiveLayerDrop",
                                ProgressiveLayerDrop)  # fmt: skip
    ours, theirs = ProgressiveLayerDrop(0.3, 0.004), theirs_cls(0.3, 0.004)
    for step in range(0, 3000, 7):
        ours.update_state(step)
        theirs.update_state(step)
        assert ours.get_state() == theirs.get_state()


def test_pld_rejects_bad_theta():
    with pytest.raises(ValueError, match="theta"):
        ProgressiveLayerDrop(theta=1.5)
