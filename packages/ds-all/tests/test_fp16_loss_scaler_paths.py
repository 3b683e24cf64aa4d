"""``ds_all.runtime.fp16.loss_scaler``: DeepSpeed's scaler classes, their schedule (ds-zero's)
and the PyTorch 2.6 ``weights_only`` loading that scripts enable with ``add_safe_globals``."""

from __future__ import annotations

import io

import pytest
import torch

from ds_all.runtime.fp16.loss_scaler import (
    CreateLossScaler,
    DynamicLossScaler,
    LossScaler,
    to_python_float,
)
from ds_all.runtime.zero.config import ZeroStageEnum


def _run(scaler, flags):
    out = []
    for overflow in flags:
        scaler.update_scale(overflow)
        out.append((scaler.cur_scale, scaler.cur_hysteresis))
    return out


def test_dynamic_schedule_by_hand():
    s = DynamicLossScaler(init_scale=2.0**16, scale_window=2, min_scale=1, delayed_shift=2,
                          consecutive_hysteresis=False)  # fmt: skip
    assert (s.loss_scale, s.dynamic, s.cur_iter, s.last_overflow_iter) == (2.0**16, True, 0, -1)
    # overflow 1 spends the hysteresis; overflow 2 halves; then the window of 2 clean steps
    # counts from the step after the last overflow (iteration 1): doubles at iteration 4
    assert _run(s, [True, True, False, False, False]) == [
        (2.0**16, 1), (2.0**15, 1), (2.0**15, 1), (2.0**15, 1), (2.0**16, 2),
    ]  # fmt: skip
    assert (s.cur_iter, s.last_overflow_iter) == (5, 1)
    floor = DynamicLossScaler(2.0, 1000, 1, 1, False)
    floor.update_scale(True)
    assert floor.cur_scale == 1.0
    with pytest.raises(FloatingPointError, match="min_loss_scale"):
        floor.update_scale(True)  # already at min_scale: DeepSpeed stops the run
    lenient = DynamicLossScaler(1.0, 1000, 1, 1, False, raise_error_at_min_scale=False)
    lenient.update_scale(True)
    assert lenient.cur_scale == 1.0
    with pytest.raises(ValueError, match="hysteresis"):
        DynamicLossScaler(2.0**16, 1000, 1, 0, False)


def test_overflow_detection_and_static_scaler():
    p = torch.nn.Parameter(torch.zeros(3))
    s = DynamicLossScaler(2.0**8, 10, 1, 1, False)
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    assert s.has_overflow([p])
    p.grad = torch.ones(3)
    assert not s.has_overflow([p]) and not LossScaler(4).has_overflow([p])
    loss = (p * 2).sum()
    p.grad = None
    LossScaler(4).backward(loss)
    assert torch.equal(p.grad, torch.full((3,), 8.0))
    assert to_python_float(torch.tensor(2.5)) == 2.5


def test_create_loss_scaler_as_deepspeed():
    args = {"init_scale": 2.0**12, "scale_window": 100, "min_scale": 1, "delayed_shift": 2,
            "consecutive_hysteresis": True}  # fmt: skip
    dyn = CreateLossScaler(torch.half, 1.0, True, args)
    assert isinstance(dyn, DynamicLossScaler) and dyn.cur_scale == 2.0**12
    assert dyn.consecutive_hysteresis and dyn.dtype == torch.half
    static = CreateLossScaler(torch.half, 128.0, False, None)
    assert type(static) is LossScaler and static.loss_scale == 128.0
    assert CreateLossScaler(torch.bfloat16, 128.0, True, args).loss_scale == 1.0
    with pytest.raises(ValueError, match="dynamic_loss_args"):
        CreateLossScaler(torch.half, 1.0, True, None)


def test_weights_only_loading_after_add_safe_globals():
    s = DynamicLossScaler(2.0**16, 4, 1, 2, False)
    _run(s, [True, False])
    buf = io.BytesIO()
    torch.save({"loss_scaler": s, "static": LossScaler(8), "stage": ZeroStageEnum.weights}, buf)
    buf.seek(0)
    with pytest.raises(Exception, match="weights_only"):
        torch.load(buf, weights_only=True)  # not allowed until the script allows it
    buf.seek(0)
    with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, DynamicLossScaler]):
        loaded = torch.load(buf, weights_only=True)
    got = loaded["loss_scaler"]
    assert type(got) is DynamicLossScaler and got.__dict__ == s.__dict__
    assert loaded["static"].loss_scale == 8 and loaded["stage"] is ZeroStageEnum.weights
    # the loaded scaler goes on where the saved one stopped
    assert _run(got, [False] * 3) == _run(s, [False] * 3)
