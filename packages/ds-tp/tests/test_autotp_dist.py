"""Tier 2 (gloo, tp=2): models sharded by AutoTP train with the losses and parameters of one
process (fp32, 1e-5 relative): a Llama-shaped model of our own (separate and fused gate_up_proj
through partition_config), a tiny transformers Llama (preset llama; qwen2's preset is the same
specs, Qwen2 the same module names),
Phi-3 (fused qkv and gate_up_proj, preset phi3) and Mixtral (3-D grouped experts, preset
mixtral). Sizes that do not divide the group are refused naming the layer."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

import ds_tp  # noqa: E402
from ds_comm.testing import distributed_test  # noqa: E402

STEPS = 2
FUSED = {
    "use_default_specs": False,
    "layer_specs": [
        {"patterns": [r".*\.o_proj\.weight$", r".*\.down_proj\.weight$"], "partition_type": "row"},
        {"patterns": [r".*\.[qkv]_proj\.weight$"], "partition_type": "column"},
        {"patterns": [r".*\.gate_up_proj\.weight$"], "partition_type": "column", "shape": [2, -1],
         "partition_dim": 0},
    ],
}  # fmt: skip


def _train(model, loss_fn, steps=STEPS):
    # SGD: Adam would turn the round-off-level gradient of a key bias (softmax ignores it) into
    # full-size steps of either sign
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for step in range(steps):
        loss = loss_fn(model, step)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _compare(make, loss_fn, group, **autotp_kwargs):
    torch.manual_seed(0)
    ref = make()
    tp = copy.deepcopy(ref)
    ds_tp.autotp(tp, group, **autotp_kwargs)
    assert any(getattr(p, "tensor_model_parallel", False) for p in tp.parameters())
    ref_losses = _train(ref, loss_fn)
    tp_losses = _train(tp, loss_fn)
    torch.testing.assert_close(torch.tensor(tp_losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    full = ds_tp.gather_full_state_dict(tp)
    for name, want in ref.state_dict().items():
        torch.testing.assert_close(
            full[name],
            want,
            rtol=1e-5,
            atol=1e-6,
            msg=lambda m, name=name: f"{type(ref).__name__} {name}: {m}",
        )
    return tp


def _own_models(group):
    from _models import TinyLlama, batch

    def loss(m, step):
        return m(batch(step))

    tp = _compare(lambda: TinyLlama(), loss, group, preset_model="llama")
    attn = tp.model.layers[0].self_attn
    assert (attn.num_heads, attn.num_key_value_heads) == (2, 1)
    assert tp.model.layers[0].mlp.gate_proj.weight.shape == (12, 16)
    tp = _compare(lambda: TinyLlama(fused=True), loss, group, partition_config=FUSED)
    up = tp.model.layers[0].mlp.gate_up_proj
    assert up.weight.shape == (24, 16) and up.sub_sizes == (24, 24)
    # heads that do not divide the group: refused naming the layer and the sizes
    with pytest.raises(ValueError, match=r"self_attn.*num_heads 3 .*tensor-parallel size 2"):
        ds_tp.autotp(TinyLlama(hidden=12, heads=3, kv=3), group, preset_model="llama")
    with pytest.raises(
        ValueError, match=r"layers\.0\.mlp\.gate_proj\.weight: dimension 0 \(size\) 15 "
    ):
        ds_tp.autotp(TinyLlama(inter=15), group, preset_model="llama")


def _hf_models(group):
    import transformers as tf

    ids = [
        torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(s))
        for s in range(STEPS)
    ]

    def loss(m, step):
        return m(input_ids=ids[step], labels=ids[step]).loss

    small = dict(vocab_size=64, eos_token_id=1, bos_token_id=0, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    cases = [
        ("llama", lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**small, attn_implementation="eager"))),
        ("phi3", lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**small, pad_token_id=0, attn_implementation="eager"))),
        ("mixtral", lambda: tf.MixtralForCausalLM(tf.MixtralConfig(
            **small, num_local_experts=4, num_experts_per_tok=2, attn_implementation="eager"))),
    ]  # fmt: skip
    for preset, make in cases:
        tp = _compare(make, loss, group, preset_model=preset)
        attn = tp.model.layers[0].self_attn
        assert attn.config.num_attention_heads == 2, preset
        assert tp.config.num_attention_heads == 4, preset  # the model's own config is untouched


@distributed_test(world_size=[2])
def test_autotp_trains_like_one_process():
    group = dist.group.WORLD
    _own_models(group)
    _hf_models(group)
