"""Tier 2: a tiny transformers Llama trained with Ulysses SP on 2 ranks equals 1 rank.

The model is built from a ``LlamaConfig`` (no download), GQA (4 query heads, 2 KV heads), SDPA
attention. Each rank's DataLoader yields its own batches of a different sequence length;
``UlyssesSPDataLoaderAdapter`` turns them into shards of one batch at a time. Every step the
whole-sequence loss (``sequence_parallel_causal_lm_loss``) is compared with the reference's
transformers loss over the unsharded batch, and after backward and the sum of gradients over the
sequence-parallel group every parameter gradient is compared with the reference's. The second
half of the steps also runs the ALST pieces (TiledMLP, the tiled logits loss and the offloaded
checkpoint), which must not change any number.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ds_seq
from ds_comm.testing import distributed_test

TOL = dict(rtol=1e-5, atol=1e-5)
VOCAB = 64


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).float()


def batches(rank, lengths):
    """The batches rank ``rank``'s own DataLoader yields (labels with ignored prompt tokens)."""
    out = []
    for i, n in enumerate(lengths):
        g = torch.Generator().manual_seed(1000 * rank + i)
        ids = torch.randint(0, VOCAB, (1, n), generator=g)
        labels = ids.clone()
        labels[:, : n // 3] = -100
        out.append({"input_ids": ids, "labels": labels, "position_ids": torch.arange(n)[None]})
    return out


def reference_grads(model, batch):
    model.zero_grad()
    out = model(
        input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"]
    )
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def sp_step(model, shard, group, tiled):
    model.zero_grad()
    ids, pos = shard["input_ids"], shard["position_ids"]
    if tiled:
        hidden = model.model(input_ids=ids, position_ids=pos).last_hidden_state
        total, count = ds_seq.tiled_causal_lm_loss_sum(
            model.lm_head, hidden, shard["shift_labels"], shards=3
        )
        loss = ds_seq.sequence_parallel_loss(total, count, group)
    else:
        logits = model(input_ids=ids, position_ids=pos).logits
        loss = ds_seq.sequence_parallel_causal_lm_loss(logits, shard["shift_labels"], group)
    loss.backward()
    grads = {}
    for n, p in model.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g, group=group)  # sum over sequence-parallel ranks (dp = 1)
        grads[n] = g
    return loss.detach(), grads


@distributed_test(world_size=2, timeout=180)
def test_tiny_llama_sp2_equals_one_process():
    from transformers import LlamaForCausalLM

    rank = dist.get_rank()
    lengths = [16, 12] if rank == 0 else [24, 8]
    mine = batches(rank, lengths)
    every = [batches(r, [16, 12] if r == 0 else [24, 8]) for r in range(2)]
    # the adapter's order: step i of a cycle is rank i's batch
    order = [every[0][0], every[1][0], every[0][1], every[1][1]]
    model = tiny_llama()
    model.train()
    ref_model = copy.deepcopy(model)
    refs = [reference_grads(ref_model, b) for b in order]  # before Ulysses is installed

    mpu = ds_seq.UlyssesSPAttentionHF.register_with_transformers(
        model, core_attn_implementation="sdpa", sequence_parallel_size=2, micro_batch_size=1,
        seq_length_is_variable=True,
    )  # fmt: skip
    assert isinstance(mpu, ds_seq.SequenceParallelGroups)
    group = mpu.get_sequence_parallel_group()
    assert mpu.get_sequence_parallel_world_size() == 2 and mpu.get_sequence_parallel_rank() == rank
    loader = ds_seq.UlyssesSPDataLoaderAdapter(mine, rank, group, 2, torch.device("cpu"))
    assert len(loader) == 4
    for step, shard in enumerate(loader):
        tiled = step >= 2
        if tiled and step == 2:
            ds_seq.enable_tiled_mlp(model, shards=2)
            ds_seq.enable_checkpoint_offload(model)
        assert shard["input_ids"].shape[1] == order[step]["input_ids"].shape[1] // 2
        loss, grads = sp_step(model, shard, group, tiled)
        ref_loss, ref_grads = refs[step]
        torch.testing.assert_close(loss, ref_loss, **TOL, msg=f"step {step}")
        for n, g in grads.items():
            torch.testing.assert_close(g, ref_grads[n], **TOL, msg=f"step {step} {n}")
    assert isinstance(model, LlamaForCausalLM)


def test_register_with_transformers_refuses_eager_and_mismatch():
    import pytest

    model = tiny_llama()
    assert ds_seq.UlyssesSPAttentionHF.register_with_transformers(model, "sdpa", 1, 1) is None
    with pytest.raises(ValueError, match="does not match model config attn_implementation='sdpa'"):
        ds_seq.UlyssesSPAttentionHF.register_with_transformers(model, "flash_attention_2", 2, 1)
    model.config._attn_implementation = "eager"
    with pytest.raises(ValueError, match="eager attn_implementation isn't supported"):
        ds_seq.UlyssesSPAttentionHF.register_with_transformers(model, "eager", 2, 1)
    with pytest.raises(ValueError, match="seq_length_is_variable"):
        ds_seq.UlyssesSPAttentionHF.register_with_transformers(
            model, "sdpa", 2, 1, seq_length_is_variable=False
        )


def test_hub_kernel_names_are_registered_with_transformers_first(monkeypatch):
    # "org/repo[@rev][:name]" is a hub-hosted kernel that transformers registers lazily: it is
    # registered before the name is checked against ALL_ATTENTION_FUNCTIONS (DeepSpeed's order)
    import pytest
    import transformers.modeling_flash_attention_utils as fa_utils

    from ds_seq._hf import _is_hub_kernel

    for name in ("kernels-community/flash-attn2", "org/repo@v1", "org/repo:fn", "org/repo@v1:fn"):
        assert _is_hub_kernel(name), name
    for name in ("sdpa", "flash_attention_2", "a/b/c", "paged|eager", None):
        assert not _is_hub_kernel(name), name

    asked = []

    def fake_lazy_import(name, *args, **kwargs):
        asked.append(name)
        raise RuntimeError("registered")

    monkeypatch.setattr(fa_utils, "lazy_import_flash_attention", fake_lazy_import, raising=False)
    model = tiny_llama()
    model.config._attn_implementation = "kernels-community/flash-attn2"
    with pytest.raises(RuntimeError, match="registered"):
        ds_seq.UlyssesSPAttentionHF.register_with_transformers(
            model, "kernels-community/flash-attn2", 2, 1
        )
    assert asked == ["kernels-community/flash-attn2"]


@distributed_test(world_size=2, timeout=180)
def test_flex_attention_gets_a_causal_block_mask_of_the_gathered_length():
    # the model's BlockMask covers the local shard; the wrapped flex_attention must get a
    # causal one over the whole gathered sequence (built once, reused by every layer)
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

    rank, world, bs, heads, hs, local = dist.get_rank(), 2, 1, 4, 8, 128
    seen = []

    def core(module, q, k, v, mask, *args, **kwargs):
        seen.append(mask)
        out = flex_attention(q, k, v, block_mask=mask)  # [bs, hc_l, sl, hs]
        return out.transpose(1, 2), None

    uattn = ds_seq.UlyssesSPAttentionHF(
        attn=core, batch_size=bs, attn_head_count=heads, attn_head_size=hs, kv_head_count=heads,
        num_hidden_layers=1, process_group=dist.group.WORLD, seq_length_is_variable=True,
    )  # fmt: skip
    uattn.core_attn_implementation = "flex_attention"
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(bs, heads, local * world, hs, generator=g) for _ in range(3)]
    q, k, v = (t[:, :, rank * local : (rank + 1) * local].contiguous() for t in full)
    pos = torch.arange(rank * local, (rank + 1) * local).unsqueeze(0)
    local_mask = create_block_mask(
        lambda b, h, qi, ki: qi >= ki, B=bs, H=None, Q_LEN=local, KV_LEN=local, device="cpu"
    )
    module = torch.nn.Module()
    out, _ = uattn(module, q, k, v, local_mask, position_ids=pos)
    uattn(module, q, k, v, local_mask, position_ids=pos)
    assert isinstance(seen[0], BlockMask) and seen[0] is seen[1]
    assert tuple(seen[0].seq_lengths) == (local * world, local * world)
    ref = F.scaled_dot_product_attention(*full, is_causal=True).transpose(1, 2)
    mine = ref[:, rank * local : (rank + 1) * local].reshape(bs, local, heads * hs)
    torch.testing.assert_close(out, mine, rtol=1e-5, atol=1e-5)
