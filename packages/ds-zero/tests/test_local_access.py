"""``local_param_state`` / ``local_param_grad`` and their setters on one rank at stage 3, against
the full accessors and plain torch AdamW (the multi-rank pieces are tested through ds-all's
DeepSpeed accessors); off stage 3 and for a parameter no engine holds they refuse."""

from __future__ import annotations

import pytest
import torch
from zero_helpers import batch, make_model, make_optimizer

import ds_zero

# LayerNorm weights/biases (24 elements) stay whole (persistent), the rest is partitioned
OPTIONS = ds_zero.ZeroOptions(stage=3, param_persistence_threshold=30)


def test_local_equals_full_and_local_sets_are_what_the_step_applies():
    ref = make_model()
    ref_opt = make_optimizer(ref)
    model = make_model()
    zero = ds_zero.wrap(model, make_optimizer(model), OPTIONS)
    params = dict(model.named_parameters())
    for s in range(3):
        x, y = batch(s, 0, 0)
        zero.backward(zero(x, y))
        ref(x, y).backward()
        if s < 2:  # the third backward's gradient is read and replaced before its step
            zero.step()
            ref_opt.step()
            ref_opt.zero_grad()
    edits = {"master": lambda t: t * 0.5, "exp_avg": lambda t: t + 0.1,
             "exp_avg_sq": lambda t: t * 2.0}  # fmt: skip
    for name, want in ref.named_parameters():
        p = params[name]
        assert ds_zero.local_param_range(p) == (0, want.numel())  # one rank holds it all
        for key in edits:
            got = ds_zero.local_param_state(p, key)
            assert got.dim() == 1 and got.dtype == torch.float32
            torch.testing.assert_close(got, ds_zero.full_param_state(p, key).reshape(-1))
        grad = ds_zero.local_param_grad(p)
        torch.testing.assert_close(grad, ds_zero.full_param_grad(p).reshape(-1))
        torch.testing.assert_close(grad, want.grad.reshape(-1), rtol=1e-6, atol=1e-7)
        # the same edits on both sides: the step must apply exactly the values written
        for key, edit in edits.items():
            value = edit(ds_zero.local_param_state(p, key).clone())
            ds_zero.set_local_param_state(p, value, key)
            ref_value = want.data if key == "master" else ref_opt.state[want][key]
            ref_value.copy_(edit(ref_value))
        ds_zero.set_local_param_grad(p, grad * 3.0)
        want.grad.mul_(3.0)
    zero.step()
    ref_opt.step()
    for name, want in ref.named_parameters():
        torch.testing.assert_close(
            ds_zero.full_param_state(params[name]), want.detach(), rtol=1e-6, atol=1e-7
        )
    x, y = batch(9, 0, 0)
    with torch.no_grad():  # the parameters followed their masters
        torch.testing.assert_close(zero(x, y), ref(x, y), rtol=1e-6, atol=1e-6)

    target = params["head.weight"]
    with pytest.raises(ValueError, match="this rank holds"):
        ds_zero.set_local_param_state(target, torch.zeros(3))
    with pytest.raises(ValueError, match="this rank holds"):
        ds_zero.set_local_param_grad(target, torch.zeros(3))
    with pytest.raises(KeyError, match="'step'"):
        ds_zero.local_param_state(target, "step")
    with pytest.raises(ds_zero.NotPartitionedError, match="not held by a ZeRO engine"):
        ds_zero.local_param_state(torch.nn.Parameter(torch.zeros(2)))


def test_local_master_set_reaches_the_bf16_parameter_and_frozen_gives_none():
    model = make_model(frozen=True)
    zero = ds_zero.wrap(
        model,
        make_optimizer(model),
        ds_zero.ZeroOptions(stage=3, param_persistence_threshold=30, param_dtype=torch.bfloat16),
    )
    params = dict(model.named_parameters())
    # a persistent parameter (whole on every rank) and a partitioned one
    for name in ("ln.weight", "blocks.1.fc1.weight"):
        p = params[name]
        value = torch.linspace(-1, 1, ds_zero.local_param_range(p)[1])
        ds_zero.set_local_param_state(p, value)
        with ds_zero.GatheredParameters([p]):
            torch.testing.assert_close(p.detach().float().reshape(-1), value.bfloat16().float())
    frozen = params["pos.weight"]
    assert ds_zero.local_param_state(frozen) is None
    assert ds_zero.local_param_grad(frozen) is None
    assert ds_zero.local_param_range(frozen) is None
    ds_zero.set_local_param_state(frozen, torch.zeros(1))  # nothing to write: no error
    del zero


@pytest.mark.parametrize("stage", [0, 2])
def test_off_stage_3_the_local_accessors_point_at_the_full_ones(stage):
    model = make_model()
    ds_zero.wrap(model, make_optimizer(model), ds_zero.ZeroOptions(stage=stage))
    p = model.head.weight
    for call in (lambda: ds_zero.local_param_state(p), lambda: ds_zero.local_param_grad(p),
                 lambda: ds_zero.set_local_param_grad(p, torch.zeros(1))):  # fmt: skip
        with pytest.raises(ds_zero.NotPartitionedError, match="stage 3 only") as info:
            call()
        assert "safe_get_full_fp32_param" in str(info.value)
        assert isinstance(info.value, AssertionError)  # what DeepSpeed raises here
