"""Tier 3 (one GPU): the offloaded checkpoint, tiled MLP and tiled loss on CUDA in bf16 and fp32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ds_seq

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_hidden_states_offload_on_cuda_matches_plain_backward_and_reuses_buffers():
    torch.manual_seed(0)
    dev = torch.device("cuda")
    layers = nn.ModuleList(
        [nn.Sequential(nn.Linear(256, 256), nn.Dropout(0.1), nn.GELU()) for _ in range(4)]
    ).to(dev)
    x = torch.randn(2, 512, 256, device=dev, requires_grad=True)
    store = ds_seq.HiddenStatesOffload()

    def run(offload):
        h = x
        torch.manual_seed(1)
        for layer in layers:
            h = store.checkpoint(layer, h) if offload else layer(h)
        return h.float().pow(2).mean()

    run(False).backward()
    ref_x, ref_w = x.grad.clone(), [p.grad.clone() for p in layers.parameters()]
    for _ in range(2):
        layers.zero_grad()
        x.grad = None
        before = torch.cuda.memory_allocated()
        loss = run(True)
        # the four layer inputs are in host memory, not on the device
        assert torch.cuda.memory_allocated() - before < 4 * x.numel() * x.element_size()
        loss.backward()
        torch.testing.assert_close(x.grad, ref_x, rtol=1e-5, atol=1e-6)
        for g, r in zip((p.grad for p in layers.parameters()), ref_w, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
        # every buffer came back to the pool, and the second step reused them
        assert store.pooled_bytes() == 4 * x.numel() * x.element_size()
        # page-locked at their exact size (torch's pinned allocator rounds up to a power of 2)
        pooled = [t for ts in store._pool.values() for t in ts]
        assert all(t.is_pinned() for t in pooled)
        page = 4096
        assert all(
            t.untyped_storage().nbytes() < t.numel() * t.element_size() + page for t in pooled
        )
    assert store.release_buffers() == 4 * x.numel() * x.element_size()
    assert store.pooled_bytes() == 0 and store.release_buffers() == 0


def test_inputs_kept_on_cuda_within_the_budget_match_plain_backward():
    torch.manual_seed(0)
    dev = torch.device("cuda")
    layers = nn.ModuleList([nn.Sequential(nn.Linear(256, 256), nn.GELU()) for _ in range(4)]).to(
        dev
    )
    x = torch.randn(2, 512, 256, device=dev, requires_grad=True)
    nbytes = x.numel() * x.element_size()

    def run(store):
        h = x
        for layer in layers:
            h = store.checkpoint(layer, h) if store is not None else layer(h)
        return h.float().pow(2).mean()

    run(None).backward()
    ref_x = x.grad.clone()
    x.grad = None
    layers.zero_grad()
    store = ds_seq.HiddenStatesOffload(keep_on_device_bytes=3 * nbytes)
    loss = run(store)
    assert store.kept_bytes() == 3 * nbytes
    loss.backward()
    assert store.kept_bytes() == 0 and store.pooled_bytes() == nbytes  # one input went to the host
    torch.testing.assert_close(x.grad, ref_x, rtol=1e-5, atol=1e-6)


def test_tiled_mlp_and_loss_on_cuda_bf16():
    torch.manual_seed(0)
    dev = torch.device("cuda")
    mlp = nn.Sequential(nn.Linear(128, 512), nn.SiLU(), nn.Linear(512, 128)).to(dev, torch.bfloat16)
    head = nn.Linear(128, 1000, bias=False).to(dev, torch.bfloat16)
    x = torch.randn(1, 4096, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 1000, (1, 4096), device=dev)
    h = ds_seq.TiledMLP.apply(lambda m, t: m(t), mlp, x, 4, None)
    total, count = ds_seq.tiled_causal_lm_loss_sum(head, h, y, shards=8)
    loss = total / count
    loss.backward()
    gx, gw = x.grad.clone(), head.weight.grad.clone()
    x.grad = None
    head.zero_grad()
    mlp.zero_grad()
    ref = F.cross_entropy(head(mlp(x)).float().flatten(0, 1), y.flatten())
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gx.float(), x.grad.float(), rtol=5e-2, atol=5e-3)
    torch.testing.assert_close(gw.float(), head.weight.grad.float(), rtol=5e-2, atol=5e-3)
