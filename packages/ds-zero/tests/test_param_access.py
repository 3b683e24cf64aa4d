"""``full_param_state`` / ``set_full_param_state`` on one rank: every stage, against plain
torch training (the multi-rank gather is tested through ds-all's DeepSpeed accessors)."""

from __future__ import annotations

import pytest
import torch
from zero_helpers import batch, make_model, make_optimizer

import ds_zero


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_full_state_equals_plain_adamw_and_set_refreshes_the_parameter(stage):
    ref = make_model()
    ref_opt = make_optimizer(ref)
    model = make_model()
    zero = ds_zero.wrap(model, make_optimizer(model), ds_zero.ZeroOptions(stage=stage))
    params = dict(model.named_parameters())
    assert all(ds_zero.owner_of(p) is zero for p in params.values())
    for s in range(2):
        x, y = batch(s, 0, 0)
        zero.backward(zero(x, y))
        zero.step()
        ref(x, y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    for name, want in ref.named_parameters():
        got = ds_zero.full_param_state(params[name])
        assert got.shape == want.shape
        torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(
            ds_zero.full_param_state(params[name], "exp_avg"),
            ref_opt.state[want]["exp_avg"], rtol=1e-6, atol=1e-7,
        )  # fmt: skip
    with pytest.raises(KeyError, match="'step'"):
        ds_zero.full_param_state(params["head.weight"], "step")  # a scalar, not per element
    # a set moves the fp32 master and, through it, the parameter the next forward uses
    target = params["head.weight"]
    new = torch.full(tuple(ref.head.weight.shape), 0.125)
    ds_zero.set_full_param_state(target, new)
    torch.testing.assert_close(ds_zero.full_param_state(target), new)
    ref.head.weight.data.copy_(new)
    x, y = batch(5, 0, 0)
    with torch.no_grad():
        torch.testing.assert_close(zero(x, y), ref(x, y), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="elements"):
        ds_zero.set_full_param_state(target, torch.zeros(3))
    with pytest.raises(ValueError, match="not held by a ZeRO engine"):
        ds_zero.full_param_state(torch.nn.Parameter(torch.zeros(2)))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_full_grad_equals_plain_grad_and_set_is_what_the_step_applies(stage):
    ref = make_model()
    model = make_model()
    zero = ds_zero.wrap(model, torch.optim.SGD(model.parameters(), lr=0.5),
                        ds_zero.ZeroOptions(stage=stage))  # fmt: skip
    params = dict(model.named_parameters())
    x, y = batch(0, 0, 0)
    zero.backward(zero(x, y))
    ref(x, y).backward()
    for name, want in ref.named_parameters():
        got = ds_zero.full_param_grad(params[name])
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got, want.grad, rtol=1e-6, atol=1e-7)
    target = params["head.weight"]
    before = ds_zero.full_param_state(target).clone()
    ds_zero.set_full_param_grad(target, torch.full(tuple(target.shape), 2.0))
    torch.testing.assert_close(ds_zero.full_param_grad(target), torch.full(target.shape, 2.0))
    with pytest.raises(ValueError, match="elements"):
        ds_zero.set_full_param_grad(target, torch.zeros(3))
    zero.step()
    torch.testing.assert_close(ds_zero.full_param_state(target), before - 0.5 * 2.0)
