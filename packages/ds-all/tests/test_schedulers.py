"""Each schedule against its formula, written independently here from DeepSpeed's docs."""

from __future__ import annotations

import math

import pytest
import torch

from ds_all import LRRangeTest, OneCycle, WarmupCosineLR, WarmupDecayLR, WarmupLR, build_scheduler


def _opt(lr: float = 0.1, groups: int = 1) -> torch.optim.Optimizer:
    ps = [{"params": [torch.nn.Parameter(torch.zeros(1))]} for _ in range(groups)]
    return torch.optim.AdamW(ps, lr=lr)


def _lrs(sched, opt, n: int) -> list[float]:
    out = []
    for _ in range(n):
        sched.step()
        out.append(opt.param_groups[0]["lr"])
    return out


@pytest.mark.parametrize("kind", ["log", "linear"])
def test_warmup_lr(kind):
    opt = _opt()
    s = WarmupLR(opt, warmup_min_lr=0.01, warmup_max_lr=0.1, warmup_num_steps=10, warmup_type=kind)
    got = _lrs(s, opt, 15)
    for it, lr in enumerate(got):
        if it < 10:
            gamma = math.log(it + 1) / math.log(10) if kind == "log" else it / 10
        else:
            gamma = 1.0
        assert lr == pytest.approx(0.01 + 0.09 * gamma, rel=1e-12), it
    assert s.state_dict() == {"last_batch_iteration": 14}


def test_warmup_decay_lr():
    opt = _opt()
    s = WarmupDecayLR(
        opt,
        total_num_steps=20,
        warmup_min_lr=0.0,
        warmup_max_lr=0.1,
        warmup_num_steps=5,
        warmup_type="linear",
    )
    got = _lrs(s, opt, 25)
    for it, lr in enumerate(got):
        gamma = it / 5 if it < 5 else max(0.0, (20 - it) / 15)
        assert lr == pytest.approx(0.1 * gamma, abs=1e-12), it
    assert got[-1] == 0.0


def test_warmup_cosine_lr():
    opt = _opt(lr=0.2)
    s = WarmupCosineLR(
        opt,
        total_num_steps=30,
        warmup_min_ratio=0.1,
        warmup_num_steps=10,
        cos_min_ratio=0.05,
        warmup_type="linear",
    )
    got = _lrs(s, opt, 40)
    for it, lr in enumerate(got):
        if it < 10:
            ratio = 0.1 + (it / 10) * 0.9
        else:
            progress = min(1.0, (it - 10 + 1) / 20)
            ratio = 0.05 + 0.95 * (1 + math.cos(math.pi * progress)) / 2
        assert lr == pytest.approx(0.2 * ratio, rel=1e-12), it
    assert got[-1] == pytest.approx(0.2 * 0.05)


@pytest.mark.parametrize("staircase", [False, True])
def test_lr_range_test(staircase):
    opt = _opt()
    s = LRRangeTest(
        opt,
        lr_range_test_min_lr=0.001,
        lr_range_test_step_size=4,
        lr_range_test_step_rate=2.0,
        lr_range_test_staircase=staircase,
    )
    assert opt.param_groups[0]["lr"] == 0.001
    got = _lrs(s, opt, 12)
    for it, lr in enumerate(got):
        interval = (it + 1) / 4
        if staircase:
            interval = math.floor(interval)
        assert lr == pytest.approx(0.001 * (1 + 2.0 * interval), rel=1e-12)


def test_one_cycle_lr_and_momentum():
    opt = _opt()
    s = OneCycle(opt, cycle_min_lr=0.01, cycle_max_lr=0.1, cycle_first_step_size=5, cycle_second_step_size=5,
                 decay_lr_rate=0.5, decay_step_size=2, cycle_min_mom=0.85, cycle_max_mom=0.95, decay_mom_rate=0.1)  # fmt: skip
    assert opt.param_groups[0]["betas"] == (0.85, 0.99)
    lrs, moms = [], []
    for _ in range(16):
        s.step()
        lrs.append(opt.param_groups[0]["lr"])
        moms.append(opt.param_groups[0]["betas"][0])
    for it in range(16):
        if it < 10:
            x = (it + 1) / 10 - math.floor((it + 1) / 10)
            scale = x / 0.5 if x <= 0.5 else (x - 1) / (0.5 - 1)
            assert lrs[it] == pytest.approx(0.01 + 0.09 * scale), it
            assert moms[it] == pytest.approx(0.95 - 0.1 * scale), it
        else:
            interval = (it - 10 + 1) / 2
            assert lrs[it] == pytest.approx(0.01 / (1 + 0.5 * interval)), it
            assert moms[it] == pytest.approx(0.95 * (1 + 0.1 * interval)), it
    assert max(lrs) == pytest.approx(0.1)


def test_per_group_values_and_state_round_trip():
    opt = _opt(groups=2)
    s = WarmupLR(
        opt,
        warmup_min_lr=[0.0, 0.01],
        warmup_max_lr=[0.1, 0.2],
        warmup_num_steps=4,
        warmup_type="linear",
    )
    _lrs(s, opt, 3)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1 * 2 / 4, 0.01 + 0.19 * 2 / 4])
    s2 = WarmupLR(
        _opt(groups=2),
        warmup_min_lr=[0.0, 0.01],
        warmup_max_lr=[0.1, 0.2],
        warmup_num_steps=4,
        warmup_type="linear",
    )
    s2.load_state_dict(s.state_dict())
    assert s2.get_lr() == s.get_lr()
    with pytest.raises(ValueError, match="warmup_max_lr: expected 2 values"):
        WarmupLR(_opt(groups=2), warmup_max_lr=[0.1])


def test_build_scheduler_errors_name_the_key():
    with pytest.raises(ValueError, match=r"did you mean 'WarmupLR'"):
        build_scheduler("WarmupLRR", _opt(), {})
    with pytest.raises(
        ValueError, match=r"'warmup_num_step' \(did you mean 'warmup_num_steps'\?\)"
    ):
        build_scheduler("WarmupLR", _opt(), {"warmup_num_step": 3})
    with pytest.raises(ValueError, match="warmup_num_steps must be a positive integer"):
        build_scheduler("WarmupLR", _opt(), {"warmup_num_steps": 0})
    with pytest.raises(ValueError, match="total_num_steps"):
        build_scheduler("WarmupDecayLR", _opt(), {})


def test_warmup_decay_and_cosine_with_log_warmup():
    """DeepSpeed's default warmup_type is "log": gamma = log(it + 1) / log(warmup_num_steps)."""
    opt = _opt()
    s = WarmupDecayLR(opt, total_num_steps=12, warmup_min_lr=0.01, warmup_max_lr=0.1,
                      warmup_num_steps=4)  # fmt: skip
    for it, lr in enumerate(_lrs(s, opt, 14)):
        gamma = math.log(it + 1) / math.log(4) if it < 4 else max(0.0, (12 - it) / 8)
        assert lr == pytest.approx(0.01 + 0.09 * gamma, rel=1e-12), it
    opt = _opt(lr=0.3)
    s = WarmupCosineLR(opt, total_num_steps=12, warmup_min_ratio=0.2, warmup_num_steps=4)
    for it, lr in enumerate(_lrs(s, opt, 12)):
        if it < 4:
            ratio = 0.2 + math.log(it + 1) / math.log(4) * 0.8
        else:
            ratio = 0.0001 + 0.9999 * (1 + math.cos(math.pi * (it - 3) / 8)) / 2
        assert lr == pytest.approx(0.3 * ratio, rel=1e-12), it


def test_defaults_are_deepspeeds():
    """WarmupLR() as DeepSpeed documents it: 0 -> 0.001 over 1000 steps, log warmup; a warmup
    of one step is clamped to two (log(1) = 0)."""
    opt = _opt()
    s = build_scheduler("WarmupLR", opt, {})
    assert opt.param_groups[0]["lr"] == 0.0
    s.step(last_batch_iteration=99)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.001 * math.log(100) / math.log(1000))
    s.step(last_batch_iteration=5000)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.001)
    s = WarmupLR(opt, warmup_max_lr=0.1, warmup_num_steps=1, warmup_type="linear")
    assert _lrs(s, opt, 3) == pytest.approx([0.0, 0.05, 0.1])


def test_one_cycle_staircase():
    """cycle_first_stair_count stairs: the lr only takes the values min + (max - min) * k / N,
    each the continuous 1Cycle value rounded down to its stair."""
    opt = _opt()
    n = 4
    s = OneCycle(opt, cycle_min_lr=0.0, cycle_max_lr=0.8, cycle_first_step_size=8,
                 cycle_first_stair_count=n, cycle_momentum=False)  # fmt: skip
    got = _lrs(s, opt, 16)
    for it, lr in enumerate(got):
        x = (it + 1) / 16 - math.floor((it + 1) / 16)
        scale = x / 0.5 if x <= 0.5 else (x - 1) / (0.5 - 1)
        assert lr == pytest.approx(0.8 * math.floor(scale * n + 1e-9) / n, abs=1e-12), it
    assert len(set(round(v, 12) for v in got)) == n + 1  # 0, 0.2, 0.4, 0.6, 0.8
