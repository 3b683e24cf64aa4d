"""Tier 2: DistributedAttention on gloo ranks against one process over the whole sequence.

Every rank regenerates the full q/k/v from one seed, takes its sequence shard, runs Ulysses
attention, and compares its output shard and the gradients of its q/k/v shards with plain SDPA
over the whole sequence (fp32, 1e-5). Configurations cover MHA, GQA with KV heads dividing the
group, KV heads that do not divide it (DeepSpeed's KV-group partition), both layouts
(batch_dim_idx 0 and 1), and two sequence lengths through the same module.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import ds_seq
from ds_comm.testing import distributed_test

TOL = dict(rtol=1e-5, atol=1e-5)


def _sdpa(q, k, v, batch_dim_idx):
    # layout -> [b, h, s, d] for SDPA and back
    perm = (0, 2, 1, 3) if batch_dim_idx == 0 else (1, 2, 0, 3)
    inv = (0, 2, 1, 3) if batch_dim_idx == 0 else (2, 0, 1, 3)
    out = F.scaled_dot_product_attention(
        *(t.permute(perm) for t in (q, k, v)), is_causal=True, enable_gqa=True
    )
    return out.permute(inv)


def _full(seed, b, s, heads, kv, d, batch_dim_idx):
    g = torch.Generator().manual_seed(seed)
    shape = (b, s) if batch_dim_idx == 0 else (s, b)
    q = torch.randn(*shape, heads, d, generator=g)
    k = torch.randn(*shape, kv, d, generator=g)
    v = torch.randn(*shape, kv, d, generator=g)
    probe = torch.randn(*shape, heads, d, generator=g)
    return q, k, v, probe


def _check(world, rank, group, heads, kv, batch_dim_idx, seqs, b=2, d=4):
    attn = ds_seq.DistributedAttention(
        lambda q, k, v: _sdpa(q, k, v, batch_dim_idx),
        group,
        scatter_idx=2,
        gather_idx=1 - batch_dim_idx,
    )
    sdim = 1 - batch_dim_idx
    for seed, s in enumerate(seqs):
        q, k, v, probe = _full(seed, b, s, heads, kv, d, batch_dim_idx)
        ref = [t.clone().requires_grad_() for t in (q, k, v)]
        ref_out = _sdpa(*ref, batch_dim_idx)
        (ref_out * probe).sum().backward()
        n = s // world
        local = [t.narrow(sdim, rank * n, n).clone().requires_grad_() for t in (q, k, v)]
        out = attn(*local, batch_dim_idx)
        (out * probe.narrow(sdim, rank * n, n)).sum().backward()
        where = f"heads={heads} kv={kv} batch_dim_idx={batch_dim_idx} s={s}"
        torch.testing.assert_close(out, ref_out.narrow(sdim, rank * n, n), **TOL, msg=where)
        for name, mine, full in zip("qkv", local, ref, strict=True):
            torch.testing.assert_close(
                mine.grad, full.grad.narrow(sdim, rank * n, n), **TOL, msg=f"d{name} {where}"
            )


@distributed_test(world_size=[2, 4])
def test_ulysses_attention_matches_full_sequence(world_size):
    rank = dist.get_rank()
    group = dist.new_group(list(range(world_size)))
    seqs = [4 * world_size, 6 * world_size]  # two lengths through one module
    for batch_dim_idx in (0, 1):
        _check(
            world_size,
            rank,
            group,
            heads=2 * world_size,
            kv=2 * world_size,
            batch_dim_idx=batch_dim_idx,
            seqs=seqs,
        )
    # GQA, KV heads divide the group
    _check(world_size, rank, group, heads=4 * world_size, kv=world_size, batch_dim_idx=0, seqs=seqs)
    # KV heads that do not divide the group: whole KV groups dealt out, the first ranks one more
    kv = world_size + 1
    _check(world_size, rank, group, heads=3 * kv, kv=kv, batch_dim_idx=0, seqs=seqs[:1])
    _check(world_size, rank, group, heads=kv, kv=kv, batch_dim_idx=1, seqs=seqs[:1])
    if world_size == 2:
        _check_loss(rank)


def _check_loss(rank):
    """Per-shard sums combined over the group equal the unsharded mean, and each rank's
    gradient is its shard of the unsharded gradient, with ignored tokens unevenly spread."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 8, 11, generator=g)
    labels = torch.randint(0, 11, (2, 8), generator=g)
    labels[:, :3] = -100  # rank 0's shard has more ignored tokens than rank 1's
    shifted = ds_seq.shift_labels(labels)
    full = logits.clone().requires_grad_()
    ref = F.cross_entropy(full.reshape(-1, 11), shifted.reshape(-1), ignore_index=-100)
    ref.backward()
    mine = logits[:, rank * 4 : rank * 4 + 4].clone().requires_grad_()
    loss = ds_seq.sequence_parallel_causal_lm_loss(mine, shifted[:, rank * 4 : rank * 4 + 4], None)
    loss.backward()
    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(mine.grad, full.grad[:, rank * 4 : rank * 4 + 4], **TOL)


def test_head_splits_follow_deepspeed():
    assert ds_seq.head_splits(8, 4) == [2, 2, 2, 2]
    assert ds_seq.head_splits(16, 4, num_kv_heads=4) == [4, 4, 4, 4]
    # 6 KV heads over 4 ranks: groups [2, 2, 1, 1], each KV group carrying 2 query heads
    assert ds_seq.head_splits(12, 4, num_kv_heads=6) == [4, 4, 2, 2]
    assert ds_seq.head_splits(6, 4, num_kv_heads=6) == [2, 2, 1, 1]
    assert ds_seq.head_splits(7, 4) == [2, 2, 2, 1]
    with pytest.raises(
        ValueError, match=r"key-value heads \(2\) must be at least the sequence parallel size \(4\)"
    ):
        ds_seq.head_splits(8, 4, num_kv_heads=2)
    with pytest.raises(ValueError, match=r"heads \(6\) must be divisible .* \(4\)"):
        ds_seq.head_splits(6, 4, num_kv_heads=4)


def test_single_rank_is_the_local_attention():
    q, k, v, _ = _full(0, 2, 8, 4, 2, 4, 0)
    attn = ds_seq.DistributedAttention(lambda q, k, v: _sdpa(q, k, v, 0), None)
    torch.testing.assert_close(attn(q, k, v, 0), _sdpa(q, k, v, 0))
    with pytest.raises(ValueError, match="batch_dim_idx must be 0"):
        attn(q, k, v, 2)


def _check_deepspeed_exchange_names(world, rank, group, heads, kv, batch_dim_idx, s=8, b=2, d=4):
    # DeepSpeed's single_all_to_all / _SeqAllToAll (scatter_idx 2: to head shards, and back
    # with scatter_idx 1) equal the differentiable heads_from_sequence / sequence_from_heads
    q, _, _, _ = _full(3, b, s, heads, kv, d, batch_dim_idx)
    sdim = 1 - batch_dim_idx
    n = s // world
    local = q.narrow(sdim, rank * n, n).contiguous()
    a = local.clone().requires_grad_()
    ref = ds_seq.heads_from_sequence(a, batch_dim_idx, group, kv)
    got_plain = ds_seq.single_all_to_all(local, 2, sdim, batch_dim_idx, group, num_kv_heads=kv)
    torch.testing.assert_close(got_plain, ref.detach(), rtol=0, atol=0)
    c = local.clone().requires_grad_()
    got = ds_seq.SeqAllToAll.apply(group, c, 2, sdim, batch_dim_idx, None, None, None, True, kv)
    torch.testing.assert_close(got, ref.detach(), rtol=0, atol=0)
    probe = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7 + rank))
    (ref * probe).sum().backward()
    (got * probe).sum().backward()
    torch.testing.assert_close(c.grad, a.grad, rtol=0, atol=0)
    # and back: head shards over the whole sequence -> sequence shards of every head
    back = ds_seq.single_all_to_all(got.detach(), 1, 2, batch_dim_idx, group, num_kv_heads=kv)
    torch.testing.assert_close(back, local, rtol=0, atol=0)
    h = got.detach().clone().requires_grad_()
    back2 = ds_seq.SeqAllToAll.apply(group, h, 1, 2, batch_dim_idx, None, None, None, True, kv)
    torch.testing.assert_close(back2, local, rtol=0, atol=0)
    (back2 * local).sum().backward()
    ref_h = ds_seq.heads_from_sequence(local, batch_dim_idx, group, kv)
    torch.testing.assert_close(h.grad, ref_h, rtol=0, atol=0)


@distributed_test(world_size=[2])
def test_deepspeed_exchange_names_match_the_ulysses_exchange(world_size):
    rank = dist.get_rank()
    for heads, kv, bdi in ((4, 4, 0), (6, 3, 1), (8, 2, 0)):
        _check_deepspeed_exchange_names(world_size, rank, dist.group.WORLD, heads, kv, bdi)
    with pytest.raises(NotImplementedError, match="async_op=False"):
        ds_seq.single_all_to_all(torch.zeros(2, 4, 4, 2), 2, 1, 0, dist.group.WORLD, async_op=True)
