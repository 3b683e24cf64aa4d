"""Sparsity layouts equal DeepSpeed's; sparse attention equals dense attention masked by them."""

from __future__ import annotations

import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from _reference import real_deepspeed, reference

from ds_data import sparse_attention as sa

LAYOUTS = reference()["sparsity"]


@pytest.mark.parametrize("case", LAYOUTS, ids=lambda c: f"{c['class']}-{c['seq_len']}-s{c['seed']}")
def test_layout_equals_recorded_deepspeed(case):
    random.seed(case["seed"])
    layout = getattr(sa, case["class"])(**case["kwargs"]).make_layout(case["seq_len"])
    assert layout.dtype == torch.int64
    assert layout.tolist() == case["layout"]


def test_private_rng_gives_the_same_layout_as_the_seeded_global_one():
    case = next(c for c in LAYOUTS if c["class"] == "BigBirdSparsityConfig")
    random.seed(case["seed"])
    expected = getattr(sa, case["class"])(**case["kwargs"]).make_layout(case["seq_len"])
    got = sa.BigBirdSparsityConfig(**case["kwargs"], rng=random.Random(case["seed"]))
    assert torch.equal(got.make_layout(case["seq_len"]), expected)


@pytest.mark.parametrize("name", ["FixedSparsityConfig", "BigBirdSparsityConfig",
                                  "VariableSparsityConfig", "BSLongformerSparsityConfig",
                                  "LocalSlidingWindowSparsityConfig", "DenseSparsityConfig"])  # fmt: skip
def test_layout_equals_installed_deepspeed(name):
    theirs = real_deepspeed("deepspeed.ops.sparse_attention", name, getattr(sa, name))
    random.seed(3)
    expected = theirs(num_heads=4, block=16).make_layout(512)
    random.seed(3)
    assert torch.equal(getattr(sa, name)(num_heads=4, block=16).make_layout(512), expected)


def _configs(block: int, heads: int = 2):
    return {
        "dense": sa.DenseSparsityConfig(heads, block),
        "fixed": sa.FixedSparsityConfig(heads, block, num_local_blocks=2),
        "fixed-uni": sa.FixedSparsityConfig(
            heads, block, attention="unidirectional", num_local_blocks=3
        ),  # fmt: skip
        "variable": sa.VariableSparsityConfig(
            heads,
            block,
            different_layout_per_head=True,
            num_random_blocks=1,
            local_window_blocks=[1, 2],
            global_block_indices=[1],
            rng=random.Random(0),
        ),  # fmt: skip
        "bigbird": sa.BigBirdSparsityConfig(
            heads, block, different_layout_per_head=True, rng=random.Random(1)
        ),  # fmt: skip
        "bigbird-uni": sa.BigBirdSparsityConfig(
            heads, block, attention="unidirectional", rng=random.Random(2)
        ),  # fmt: skip
        "bslongformer": sa.BSLongformerSparsityConfig(heads, block, global_block_indices=[0, 5]),
        "local": sa.LocalSlidingWindowSparsityConfig(heads, block, num_sliding_window_blocks=3),
    }


def _reference_attention(layout, block, q, k, v):
    """Independent reference: PyTorch's SDPA with the layout expanded by a Kronecker product."""
    ones = torch.ones(block, block, dtype=torch.int64)
    mask = torch.stack([torch.kron(layout[h], ones) for h in range(layout.shape[0])]).bool()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None])


def _inputs(heads, L, d=8, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(L)
    return [torch.randn(2, heads, L, d, generator=g, dtype=torch.float32).to(device, dtype)
            .requires_grad_() for _ in range(3)]  # fmt: skip


@pytest.mark.parametrize("name", list(_configs(16)))
def test_outputs_and_gradients_equal_masked_dense(name):
    cfg, L = _configs(16)[name], 160
    module = sa.SparseSelfAttention(cfg, max_seq_length=L)
    q, k, v = _inputs(cfg.num_heads, L)
    out = module(q, k, v)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref = _reference_attention(module.get_layout(L), 16, q, k, v)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("block", "L"), [(16, 256), (128, 512), (256, 1024), (48, 192)])
@pytest.mark.parametrize("name", ["bigbird-uni", "variable"])
def test_block_mask_from_layout_is_exact(block, L, name):
    # FlexAttention's eager path runs on CPU (forward only): it checks the BlockMask built from
    # the layout, tiles aligned (block 16 pooled, 128 direct, 256 expanded) or not (48).
    from torch.nn.attention.flex_attention import flex_attention

    cfg = _configs(block)[name]
    module = sa.SparseSelfAttention(cfg, max_seq_length=L)
    q, k, v = (t.detach() for t in _inputs(cfg.num_heads, L))
    layout = module.get_layout(L)
    block_mask = sa.layout_block_mask(layout, block, L, "cpu")
    dense = block_mask.to_dense()[0].bool()  # (heads, q tiles, kv tiles)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = flex_attention(q, k, v, block_mask=block_mask)
    torch.testing.assert_close(
        out, _reference_attention(layout, block, q, k, v), atol=1e-5, rtol=1e-5
    )
    # No tile holding an attended block is skipped, and with aligned tiles none is kept in vain.
    token = torch.stack([torch.kron(layout[h], torch.ones(block, block, dtype=torch.int64))
                         for h in range(layout.shape[0])]).bool()  # fmt: skip
    n, tile = dense.shape[-1], sa.TILE
    padded = F.pad(token, (0, n * tile - L, 0, n * tile - L))
    tiles = padded.view(token.shape[0], n, tile, n, tile).any(dim=(2, 4))
    assert torch.equal(dense.expand_as(tiles), tiles)


@pytest.mark.parametrize("mode", ["add", "mul"])
def test_masks_and_rpe_follow_deepspeed_modes(mode):
    cfg = sa.BSLongformerSparsityConfig(2, 16)
    module = sa.SparseSelfAttention(cfg, key_padding_mask_mode=mode, attn_mask_mode=mode,
                                    max_seq_length=64)  # fmt: skip
    q, k, v = _inputs(2, 64)
    g = torch.Generator().manual_seed(5)
    if mode == "mul":
        kpm = (torch.rand(2, 64, generator=g) > 0.2).float()
        kpm[:, 0] = 1  # a row must keep one key
        am = torch.tril(torch.ones(64, 64))
        additive_kpm = torch.where(kpm == 0, float("-inf"), 0.0)
        additive_am = torch.where(am == 0, float("-inf"), 0.0)
    else:
        kpm, am = torch.randn(2, 64, generator=g), torch.randn(64, 64, generator=g)
        additive_kpm, additive_am = kpm, am
    rpe = torch.randn(1, 2, 64, 64, generator=g)
    out = module(q, k.transpose(-1, -2), v, rpe=rpe, key_padding_mask=kpm, attn_mask=am)
    token = module.token_mask(64)
    bias = rpe + additive_kpm[:, None, None, :] + additive_am
    bias = bias.masked_fill(~token, float("-inf"))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_bad_inputs_are_refused():
    module = sa.SparseSelfAttention(sa.FixedSparsityConfig(2, 16), max_seq_length=64)
    q = torch.randn(1, 2, 40, 8)
    with pytest.raises(ValueError, match="multiple of the block size"):
        module(q, q, q)
    q = torch.randn(1, 2, 128, 8)
    with pytest.raises(ValueError, match="max_seq_length"):
        module(q, q, q)
    with pytest.raises(ValueError, match="attn_mask_mode"):
        sa.SparseSelfAttention(attn_mask_mode="max")
    with pytest.raises(ValueError, match="num_different_global_patterns"):
        sa.FixedSparsityConfig(4, num_different_global_patterns=2)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(_configs(16)))
@pytest.mark.parametrize("block", [16, 128])
def test_flex_attention_on_gpu_equals_masked_dense(name, block):
    # block 16: tiles of 128 pooled from 8 x 8 layout blocks (partial tiles run the element
    # mask); block 128: one layout block per tile (full tiles only).
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg, L = _configs(block)[name], 16 * block
    module = sa.SparseSelfAttention(cfg, max_seq_length=L).cuda()
    q, k, v = _inputs(cfg.num_heads, L, d=16, device="cuda")
    out = module(q, k, v)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref = _reference_attention(module.get_layout(L).cpu(), block, *(t.cpu() for t in (q, k, v)))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    torch.testing.assert_close(out.cpu(), ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.cpu(), b, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_flex_attention_masks_on_gpu_equal_cpu_path():
    torch.backends.cuda.matmul.allow_tf32 = False
    module = sa.SparseSelfAttention(sa.BigBirdSparsityConfig(2, 16, rng=random.Random(0)),
                                    key_padding_mask_mode="mul", max_seq_length=256)  # fmt: skip
    q, k, v = (t.detach() for t in _inputs(2, 256, d=16))
    kpm = (torch.rand(2, 256, generator=torch.Generator().manual_seed(0)) > 0.3).float()
    kpm[:, 0] = 1
    rpe = torch.randn(1, 2, 256, 256, generator=torch.Generator().manual_seed(1))
    am = torch.randn(256, 256, generator=torch.Generator().manual_seed(2))
    expected = module(q, k, v, rpe=rpe, key_padding_mask=kpm, attn_mask=am)
    cuda = module.cuda()
    got = cuda(*(t.cuda() for t in (q, k, v)), rpe=rpe.cuda(), key_padding_mask=kpm.cuda(),
               attn_mask=am.cuda())  # fmt: skip
    torch.testing.assert_close(got.cpu(), expected, atol=1e-5, rtol=1e-5)


def test_bert_sparse_self_attention_and_padding():
    from types import SimpleNamespace

    torch.manual_seed(0)
    cfg = SimpleNamespace(hidden_size=32, num_attention_heads=4)
    layer = sa.BertSparseSelfAttention(cfg, sa.BSLongformerSparsityConfig(4, 16))
    ids = torch.randint(1, 50, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.long)
    pad, ids_p, mask_p, types_p, pos_p, _ = sa.SparseAttentionUtils.pad_to_block_size(
        16, ids, mask, torch.zeros_like(ids), torch.arange(40).expand(2, 40), None, pad_token_id=0
    )
    assert (
        pad == 8 and ids_p.shape == (2, 48) and mask_p[:, 40:].sum() == 0 and pos_p.shape == (2, 48)
    )
    hidden = torch.randn(2, 48, 32)
    additive = (1.0 - mask_p[:, None, None, :].float()) * -10000.0  # BERT's extended mask
    out = layer(hidden, additive)

    def heads(x):
        return x.view(2, 48, 4, 8).transpose(1, 2)

    q, k, v = heads(layer.query(hidden)), heads(layer.key(hidden)), heads(layer.value(hidden))
    bias = additive.expand(2, 4, 48, 48).masked_fill(
        ~layer.sparse_self_attention.token_mask(48), float("-inf")
    )
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(2, 48, 32)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert sa.SparseAttentionUtils.unpad_sequence_output(pad, out).shape == (2, 40, 32)
