"""Tier 1: tiled compute and the offloaded checkpoint against the untiled computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ds_seq

TOL = dict(rtol=1e-5, atol=1e-5)


class _MLP(nn.Module):
    def __init__(self, h=8, i=20, bias=False):
        super().__init__()
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def _hook_counts(module):
    counts = {}
    for n, p in module.named_parameters():
        counts[n] = 0
        p.register_post_accumulate_grad_hook(lambda _p, n=n: counts.__setitem__(n, counts[n] + 1))
    return counts


@pytest.mark.parametrize("shape,shards", [((2, 13, 8), 4), ((13, 8), 3), ((1, 16, 8), 1)])
def test_tiled_mlp_matches_untiled(shape, shards):
    torch.manual_seed(0)
    mlp = _MLP(bias=True)
    x = torch.randn(*shape, requires_grad=True)
    probe = torch.randn(*shape)
    (mlp(x) * probe).sum().backward()
    ref_x, ref = x.grad.clone(), _grads(mlp)
    mlp.zero_grad()
    x.grad = None
    counts = _hook_counts(mlp)
    # DeepSpeed's recipe lists only the weights; the biases are found through the module
    weights = [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
    out = ds_seq.TiledMLP.apply(lambda self, t: _MLP.forward(self, t), mlp, x, shards, weights)
    torch.testing.assert_close(out, mlp(x).detach(), **TOL)
    (out * probe).sum().backward()
    torch.testing.assert_close(x.grad, ref_x, **TOL)
    for n, g in _grads(mlp).items():
        torch.testing.assert_close(g, ref[n], **TOL, msg=n)
    # one accumulation per parameter per backward, whatever the tile count (ZeRO hooks)
    assert set(counts.values()) == {1}


def test_enable_tiled_mlp_on_a_module():
    torch.manual_seed(0)
    model = nn.Sequential(_MLP(), _MLP())
    x = torch.randn(2, 40, 8, requires_grad=True)
    model(x).pow(2).sum().backward()
    ref_x, ref = x.grad.clone(), _grads(model)
    model.zero_grad()
    x.grad = None
    assert ds_seq.enable_tiled_mlp(model, shards=3) == 2
    model(x).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, ref_x, **TOL)
    for n, g in _grads(model).items():
        torch.testing.assert_close(g, ref[n], **TOL, msg=n)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("use_mask", [False, True])
def test_tiled_fused_logits_loss_matches_untiled(reduction, use_mask):
    torch.manual_seed(0)
    head = nn.Linear(8, 50)
    x = torch.randn(2, 12, 8, requires_grad=True)
    y = torch.randint(0, 50, (2, 12))
    mask = (torch.rand(2, 12) > 0.3).long() if use_mask else None

    def loss_fn(self, xs, ys, ms=None):
        per_token = F.cross_entropy(self(xs), ys, reduction="none")
        if ms is not None:
            per_token = per_token * ms
        return per_token.sum()

    # reference: the same per-tile sums with the whole logits materialised
    shards = 4
    tiles = [
        loss_fn(head, xs, ys, ms)
        for xs, ys, ms in zip(
            x.reshape(-1, 8).chunk(shards),
            y.reshape(-1).chunk(shards),
            mask.reshape(-1).chunk(shards) if use_mask else [None] * shards,
            strict=True,
        )
    ]
    ref_loss = torch.stack(tiles).mean() if reduction == "mean" else torch.stack(tiles).sum()
    (ref_loss * 3.0).backward()  # an incoming gradient other than 1 (loss scale, 1/GAS)
    ref_x, ref = x.grad.clone(), _grads(head)
    head.zero_grad()
    x.grad = None
    counts = _hook_counts(head)
    loss = ds_seq.TiledFusedLogitsLoss.apply(
        loss_fn, head, x, y, mask, shards, [head.weight], reduction
    )
    # nothing accumulated into .grad before backward (the tiles' gradients wait in the graph)
    assert head.weight.grad is None and set(counts.values()) == {0}
    torch.testing.assert_close(loss, ref_loss.detach(), **TOL)
    (loss * 3.0).backward()
    torch.testing.assert_close(x.grad, ref_x, **TOL)
    for n, g in _grads(head).items():
        torch.testing.assert_close(g, ref[n], **TOL, msg=n)
    assert set(counts.values()) == {1}


def test_tiled_causal_lm_loss_equals_plain_cross_entropy():
    torch.manual_seed(0)
    head = nn.Linear(8, 30, bias=False)
    x = torch.randn(1, 20, 8, requires_grad=True)
    labels = torch.randint(0, 30, (1, 20))
    labels[0, :5] = -100
    shifted = ds_seq.shift_labels(labels)
    ref = F.cross_entropy(head(x).reshape(-1, 30), shifted.reshape(-1), ignore_index=-100)
    ref.backward()
    ref_x, ref_w = x.grad.clone(), head.weight.grad.clone()
    head.zero_grad()
    x.grad = None
    total, count = ds_seq.tiled_causal_lm_loss_sum(head, x, shifted, shards=3)
    loss = ds_seq.sequence_parallel_loss(total, count, None)
    loss.backward()
    torch.testing.assert_close(loss, ref.detach(), **TOL)
    torch.testing.assert_close(x.grad, ref_x, **TOL)
    torch.testing.assert_close(head.weight.grad, ref_w, **TOL)


@pytest.mark.parametrize("reduction,dim", [(None, 1), ("sum", 0), ("mean", 0), ("mean", 1)])
def test_sequence_tiled_compute_matches_untiled(reduction, dim):
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    x = torch.randn(2, 11, 8, requires_grad=True)
    scale = torch.randn(2, 11, 1)

    def fn(hidden, factor, power):
        out = torch.tanh(lin(hidden)) * factor
        return out.pow(power).sum() if dim == 0 else out.pow(power)

    step = -(-11 // 4)
    pieces = [fn(x[:, i : i + step], scale[:, i : i + step], 2) for i in range(0, 11, step)]
    full = torch.stack(pieces) if dim == 0 else torch.cat(pieces, dim=1)
    ref = full if reduction is None else (full.mean() if reduction == "mean" else full.sum())
    probe = torch.randn_like(ref)
    (ref * probe).sum().backward()
    ref_x, ref_w = x.grad.clone(), lin.weight.grad.clone()
    lin.zero_grad()
    x.grad = None
    out = ds_seq.sequence_tiled_compute(
        fn, 11, 4, {"hidden": x, "factor": scale}, {"power": 2}, "hidden", [lin.weight, lin.bias],
        output_unshard_dimension=dim, output_reduction=reduction,
    )  # fmt: skip
    torch.testing.assert_close(out, ref.detach(), **TOL)
    (out * probe).sum().backward()
    torch.testing.assert_close(x.grad, ref_x, **TOL)
    torch.testing.assert_close(lin.weight.grad, ref_w, **TOL)


def test_checkpoint_offload_matches_plain_backward():
    torch.manual_seed(0)
    layers = nn.ModuleList(
        [nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.3), nn.GELU()) for _ in range(3)]
    )
    x = torch.randn(4, 8, requires_grad=True)

    def run(offload):
        h = x
        torch.manual_seed(1)
        for layer in layers:
            h = (
                ds_seq.checkpoint_offload(layer, h, offload_cpu_inputs=True)
                if offload
                else layer(h)
            )
        return h.pow(2).sum()

    run(False).backward()
    ref_x, ref = x.grad.clone(), _grads(layers)
    layers.zero_grad()
    x.grad = None
    loss = run(True)
    loss.backward()  # dropout replayed with the forward's random state
    torch.testing.assert_close(x.grad, ref_x, **TOL)
    for n, g in _grads(layers).items():
        torch.testing.assert_close(g, ref[n], **TOL, msg=n)


def test_bad_arguments_are_named():
    head = nn.Linear(4, 4)
    x, y = torch.randn(1, 4, 4), torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="unknown reduction avg"):
        ds_seq.TiledFusedLogitsLoss.apply(lambda *a: a[1].sum(), head, x, y, None, 2, None, "avg")
    with pytest.raises(ValueError, match="shards must be >= 1"):
        ds_seq.TiledMLP.apply(lambda s, t: t, head, x, 0, None)
    with pytest.raises(ValueError, match="grad_requiring_tensor_key 'h'"):
        ds_seq.sequence_tiled_compute(lambda x: x, 4, 2, {"x": x}, {}, "h")


def test_keep_on_device_bytes_keeps_the_first_inputs_within_the_budget():
    torch.manual_seed(0)
    layers = nn.ModuleList(
        [nn.Sequential(nn.Linear(32, 32), nn.Dropout(0.2), nn.GELU()) for _ in range(4)]
    )
    x = torch.randn(64, 32, requires_grad=True)
    nbytes = x.numel() * x.element_size()

    def run(store):
        h = x
        torch.manual_seed(1)
        for layer in layers:
            h = store.checkpoint(layer, h) if store is not None else layer(h)
        return h.pow(2).sum()

    run(None).backward()
    ref_x, ref = x.grad.clone(), _grads(layers)
    layers.zero_grad()
    x.grad = None
    store = ds_seq.HiddenStatesOffload(offload_cpu_inputs=True, keep_on_device_bytes=2 * nbytes + 1)
    copied = []
    offload = store.offload
    store.offload = lambda t: copied.append(t) or offload(t)
    loss = run(store)
    # the first two layers' inputs stay; the last two are copied (the budget has no room)
    assert store.kept_bytes() == 2 * nbytes and len(copied) == 2
    loss.backward()
    assert store.kept_bytes() == 0
    torch.testing.assert_close(x.grad, ref_x, **TOL)
    for n, g in _grads(layers).items():
        torch.testing.assert_close(g, ref[n], **TOL, msg=n)
    # a kept input changed in place before backward is refused, not silently recomputed
    h = x * 1.0
    out = store.checkpoint(layers[0], h)
    h.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        out.sum().backward()
    with pytest.raises(ValueError, match="keep_on_device_bytes must be >= 0"):
        ds_seq.HiddenStatesOffload(keep_on_device_bytes=-1)


def test_parameters_fn_uses_but_nobody_listed_still_get_their_gradients():
    # self=None and compute_params=[]: the MLP's parameters are found in the tiles' graph and
    # get the untiled gradients, accumulated once per backward (their hooks fire once)
    torch.manual_seed(0)
    mlp = _MLP(bias=True)
    x = torch.randn(2, 13, 8, requires_grad=True)
    probe = torch.randn(2, 13, 8)
    (mlp(x) * probe).sum().backward()
    ref_x, ref = x.grad.clone(), _grads(mlp)
    mlp.zero_grad()
    x.grad = None
    counts = _hook_counts(mlp)
    out = ds_seq.TiledMLP.apply(lambda _self, t: mlp(t), None, x, 4, [])
    (out * probe).sum().backward()
    torch.testing.assert_close(x.grad, ref_x, **TOL)
    for n, g in _grads(mlp).items():
        torch.testing.assert_close(g, ref[n], **TOL, msg=n)
    assert set(counts.values()) == {1}

    # sequence_tiled_compute, nothing listed
    mlp.zero_grad()
    x.grad = None
    out = ds_seq.sequence_tiled_compute(
        lambda hidden: mlp(hidden), 13, 3, {"hidden": x}, {}, "hidden", [], 1, None
    )
    (out * probe).sum().backward()
    torch.testing.assert_close(x.grad, ref_x, **TOL)
    for n, g in _grads(mlp).items():
        torch.testing.assert_close(g, ref[n], **TOL, msg=n)


def test_unlisted_loss_parameters_get_the_scaled_gradient():
    # the loss's tile backward runs in forward with an incoming gradient of 1; an unlisted
    # head's gradient is scaled by the real one (here 3, like a loss scale) at backward
    torch.manual_seed(0)
    head = nn.Linear(8, 11)
    x = torch.randn(2, 9, 8, requires_grad=True)
    y = torch.randint(0, 11, (2, 9))
    (3 * F.cross_entropy(head(x).reshape(-1, 11), y.reshape(-1), reduction="sum")).backward()
    ref_x, ref = x.grad.clone(), _grads(head)
    head.zero_grad()
    x.grad = None

    def loss_fn(_self, xs, ys):
        return F.cross_entropy(head(xs), ys, reduction="sum")

    loss = ds_seq.TiledFusedLogitsLoss.apply(loss_fn, None, x, y, None, 3, [], "sum")
    (3 * loss).backward()
    torch.testing.assert_close(x.grad, ref_x, **TOL)
    for n, g in _grads(head).items():
        torch.testing.assert_close(g, ref[n], **TOL, msg=n)
