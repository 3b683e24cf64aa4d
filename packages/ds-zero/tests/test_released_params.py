"""A released stage-3 parameter is DeepSpeed's: ``.data`` has no elements (in-place ops on it do
nothing), ``ds_shape`` / ``ds_numel`` / ``ds_id`` describe it; gathered, it is the full view
of its bucket and trains exactly like plain PyTorch (one process; the ``gpu`` case on one GPU:
PYTHONPATH=$(ls -d packages/*/src | tr '\\n' ':') python -m pytest
packages/ds-zero/tests/test_released_params.py -q -m gpu)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zero_helpers import D, TinyLM, assert_close_state, batch, make_model, make_optimizer

import ds_zero


def _init_fn(module: nn.Module) -> None:
    # a block's init also writes a child's weight, which its caller did not gather
    if hasattr(module, "fc1") and hasattr(module, "ln"):
        nn.init.normal_(module.fc1.weight, std=5.0)
    if isinstance(module, nn.LayerNorm):
        nn.init.constant_(module.weight, 0.75)


def _walk_own_params(model: nn.Module) -> None:
    for module in model.modules():
        with ds_zero.GatheredParameters(list(module.parameters(recurse=False)), modifier_rank=0):
            _init_fn(module)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_init_params_are_released_like_deepspeeds_and_train_like_plain(device):
    with torch.device(device):
        ref = make_model()
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.fill_(0.75)  # only the modules' own parameters change
    torch.manual_seed(0)
    with torch.device(device), ds_zero.Init():
        model = TinyLM()
    w = model.blocks[0].fc1.weight
    assert w.numel() == 0 and w.dtype == torch.float32 and w.untyped_storage().size() == 0
    assert w.device.type == device
    assert w.ds_shape == (4 * D + 3, D) and w.ds_numel == (4 * D + 3) * D
    ids = [p.ds_id for p in model.parameters()]
    assert len(set(ids)) == len(ids)

    _walk_own_params(model)
    with ds_zero.GatheredParameters(list(model.parameters())):
        for name, p in model.named_parameters():
            assert torch.equal(p, ref.get_parameter(name)), name
        # nested: the inner block neither re-gathers over nor releases the outer one's values
        with torch.no_grad():
            w[0, 0] = 9.0
        with ds_zero.GatheredParameters([w]):
            assert w[0, 0].item() == 9.0
        assert w.shape == w.ds_shape
        with torch.no_grad():
            w[0, 0] = ref.blocks[0].fc1.weight[0, 0]
    assert w.numel() == 0

    opts = ds_zero.ZeroOptions(stage=3, param_persistence_threshold=40)
    zero = ds_zero.wrap(model, make_optimizer(model), opts)
    ref_opt = make_optimizer(ref)
    shapes: list[tuple[int, ...]] = []
    hook = model.blocks[1].fc2.register_forward_pre_hook(
        lambda m, a: shapes.append(tuple(m.weight.shape))
    )
    for s in range(3):
        x, y = (t.to(device) for t in batch(s, 0, 0))
        loss = zero(x, y)
        zero.backward(loss)
        assert zero.step()
        ref_loss = ref(x, y)
        ref_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6 if device == "cpu" else 1e-5)
    hook.remove()
    assert shapes == [(D, 4 * D + 3)] * 3
    assert w.numel() == 0 and w.ds_numel == (4 * D + 3) * D
    state = zero.full_state_dict()
    tol = {"rtol": 1e-6, "atol": 1e-7} if device == "cpu" else {"rtol": 1e-5, "atol": 1e-6}
    assert_close_state(state, ref.state_dict(), **tol)
    # a released parameter of the wrapped model: in-place ops do nothing, as with DeepSpeed
    _walk_own_params(model)
    with torch.no_grad():
        nn.init.normal_(w)
    after = zero.full_state_dict()
    assert torch.equal(after["blocks.0.fc1.weight"], state["blocks.0.fc1.weight"])
    assert torch.all(after["blocks.1.ln.weight"] == 0.75)  # gathered: written back to the master
    zero.close()


def test_wrapped_plain_model_gets_deepspeeds_attributes():
    model = make_model()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    opts = ds_zero.ZeroOptions(stage=3, param_persistence_threshold=40)
    zero = ds_zero.wrap(model, make_optimizer(model), opts)
    for name, p in model.named_parameters():
        assert tuple(p.ds_shape) == shapes[name] and p.ds_numel == p.ds_shape.numel(), name
        # persistent (small) parameters stay whole, the others are released
        assert p.numel() == (p.ds_numel if p.ds_numel <= 40 else 0), name
    assert len({p.ds_id for p in model.parameters()}) == len(shapes)
    total = sum(shape.numel() for shape in map(torch.Size, shapes.values()))
    assert ds_zero.memory_estimate(model, 3, 2) == ds_zero.memory_estimate(total, 3, 2)
    zero.close()
