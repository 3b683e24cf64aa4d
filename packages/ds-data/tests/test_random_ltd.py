"""random-LTD: gathered/scattered layers equal a per-token reference, forward and backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ds_data
from ds_data import (
    DataConfigError,
    RandomLayerTokenDrop,
    RandomLTDScheduler,
    convert_to_random_ltd,
    gather_tokens,
    random_ltd_initialize,
    remove_random_ltd_state_dict,
    scatter_tokens,
)

H = 8


class Block(nn.Module):
    """A layer whose tokens interact (attention-like mixing), with an optional additive mask."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(H, H)

    def forward(self, x, attention_mask=None):  # x: (batch, seq, H)
        scores = x @ x.transpose(1, 2) / H**0.5
        if attention_mask is not None:
            scores = scores + attention_mask[:, 0]
        return torch.tanh(self.proj(torch.softmax(scores, -1) @ x)) + x


class Net(nn.Module):
    def __init__(self, layers=4):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(layers))

    def forward(self, x, attention_mask=None):
        for layer in self.layers:
            x = layer(x, attention_mask=attention_mask)
        return x


def _config(layer_ids, model_type="decoder", order="batch_seq_dim", mask="attention_mask"):
    return {
        "total_layer_num": 4, "random_ltd_layer_num": len(layer_ids),
        "random_ltd_layer_id": layer_ids, "model_mask_name": mask, "model_type": model_type,
        "hidden_state_order": order, "global_batch_size": 2, "micro_batch_size": 2,
        "random_ltd_schedule": {"min_value": 4, "max_value": 12, "schedule_type": "fixed_linear",
                                "schedule_config": {"require_steps": 8, "seq_per_step": 2}},
    }  # fmt: skip


def _wrapped(layer_ids, **kw):
    torch.manual_seed(0)
    net = Net()
    reference = Net()
    reference.load_state_dict(net.state_dict())
    convert_to_random_ltd(net, Block)
    cfg = _config(layer_ids, **kw)
    scheduler = RandomLTDScheduler(cfg)
    assert random_ltd_initialize(net, cfg, scheduler) == len(layer_ids)
    return net, reference, scheduler


def _manual(reference, x, indices, layer_ids, mask, model_type):
    """Each chosen layer applied sample by sample to the kept tokens, by index arithmetic."""
    chosen = {lid: row for row, lid in enumerate(sorted(layer_ids))}
    for i, layer in enumerate(reference.layers):
        if i not in chosen:
            x = layer(x, attention_mask=mask)
            continue
        outs = []
        for b in range(x.shape[0]):
            keep = indices[chosen[i], b]
            if mask is None:
                m = None
            elif model_type == "decoder":
                m = mask[b : b + 1, :, : len(keep), : len(keep)]
            else:
                m = mask[b : b + 1][:, :, keep][:, :, :, keep]
            part = layer(x[b : b + 1, keep], attention_mask=m)
            row = x[b : b + 1].clone()
            row[:, keep] = part
            outs.append(row)
        x = torch.cat(outs)
    return x


@pytest.mark.parametrize("model_type", ["decoder", "encoder"])
def test_forward_and_gradients_equal_manual_reference(model_type):
    net, reference, scheduler = _wrapped([1, 2], model_type=model_type)
    scheduler.update_seq(2)  # 4 + 2/8 * 8 = 6 tokens kept of 12
    assert scheduler.get_current_seq() == 6
    x = torch.randn(2, 12, H, requires_grad=True)
    if model_type == "decoder":
        mask = torch.triu(torch.full((12, 12), -1e4), 1).expand(2, 1, 12, 12)
    else:
        mask = torch.where(torch.rand(2, 1, 12, 12) > 0.3, 0.0, -1e4)
    out = net(x, attention_mask=mask)
    indices = scheduler.state["sample_idx"]
    assert indices.shape == (2, 2, 6) and bool((indices.diff(dim=-1) > 0).all())
    x_ref = x.detach().clone().requires_grad_()
    ref = _manual(reference, x_ref, indices, [1, 2], mask, model_type)
    torch.testing.assert_close(out, ref)
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    for (name, p), q in zip(net.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_seq_first_order_matches_batch_first():
    torch.manual_seed(1)
    x = torch.randn(3, 10, H, dtype=torch.float64, requires_grad=True)
    idx = torch.stack([torch.randperm(10)[:4].sort().values for _ in range(3)])
    part_b = gather_tokens(x, idx, batch_first=True)
    part_s = gather_tokens(x.transpose(0, 1), idx, batch_first=False)
    torch.testing.assert_close(part_b, part_s.transpose(0, 1))
    torch.autograd.gradcheck(lambda t: gather_tokens(t, idx, True), (x,))
    part = torch.randn(3, 4, H, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda a, p: scatter_tokens(a, p, idx, True), (x, part))
    merged = scatter_tokens(x.transpose(0, 1), part.transpose(0, 1), idx, batch_first=False)
    torch.testing.assert_close(merged.transpose(0, 1), scatter_tokens(x, part, idx, True))


def test_no_drop_in_eval_or_at_full_length_and_state_dict_unwraps():
    net, reference, scheduler = _wrapped([0, 3])
    x = torch.randn(2, 12, H)
    scheduler.update_seq(0)
    net.eval()
    torch.testing.assert_close(net(x), reference(x))
    net.train()
    scheduler.update_seq(100)  # max_value 12 = the whole sequence
    torch.testing.assert_close(net(x), reference(x))
    assert any(".random_ltd_layer." in k for k in net.state_dict())
    plain = Net()
    plain.load_state_dict(remove_random_ltd_state_dict(net.state_dict()))
    torch.testing.assert_close(plain(x), reference(x))
    assert isinstance(net.layers[0], RandomLayerTokenDrop)
    assert ds_data.save_without_random_ltd(net).keys() == reference.state_dict().keys()


def test_layer_count_mismatch_and_bad_order_are_refused():
    torch.manual_seed(0)
    net = convert_to_random_ltd(Net(), Block)
    cfg = _config([1, 7])
    with pytest.raises(DataConfigError, match="random_ltd_layer_num"):
        random_ltd_initialize(net, cfg, RandomLTDScheduler(cfg))
    cfg = _config([1], order="hidden_batch_seq")
    with pytest.raises(DataConfigError, match="hidden_state_order"):
        random_ltd_initialize(net, cfg, RandomLTDScheduler(cfg))
