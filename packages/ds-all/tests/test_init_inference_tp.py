"""init_inference with tensor parallelism on 2 gloo ranks, every case in one launch: the split
model's outputs equal the whole model's (fp32) for a Llama-shaped and a BERT-shaped model
split by AutoTP's parser, a model split by an injection_policy, a meta-built model filled from
a checkpoint, and a transformers LlamaForCausalLM (when transformers is installed); the group
from tp_size, tp_group or an mpu; one random state on both ranks; refusals."""

from __future__ import annotations

import copy
import json
import os
import sys
from typing import Any

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from _inference_models import (  # noqa: E402
    VOCAB,
    BertLike,
    LlamaLike,
    PlainLayer,
    PlainLike,
    ids,
    tiny_llama_config,
)

from ds_comm.testing import run_distributed  # noqa: E402

TOL = 1e-5
CKPT_SEED = 3


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


class _MPU:
    """A Megatron-style unit whose model-parallel group is the world."""

    def get_model_parallel_group(self) -> Any:
        import torch.distributed as dist

        return dist.group.WORLD


def _rank_main(ckpt: str) -> dict[str, Any]:
    import torch.distributed as dist

    import ds_all
    from ds_all import ConfigError

    out: dict[str, Any] = {}
    x = ids(1)

    # the parser finds Llama's o_proj/down_proj rows; the attention's sizes become local
    torch.manual_seed(0)
    ref = LlamaLike()
    e = ds_all.init_inference(
        copy.deepcopy(ref), dtype=torch.float32, tensor_parallel={"tp_size": 2}
    )
    attn = e.module.layers[0].self_attn
    assert attn.q_proj.weight.shape == (8, 16) and attn.o_proj.weight.shape == (16, 8)
    assert (attn.num_heads, attn.hidden_size) == (2, 8)
    assert e.module.lm_head.weight.shape == (VOCAB, 16)  # stays whole
    assert e.mp_group is not None and dist.get_world_size(e.mp_group) == 2
    with torch.no_grad():
        out["llama"] = _diff(e(x), ref(x))
        out["llama_generate"] = bool(torch.equal(e.generate(input_ids=x), ref.generate(x)))

    # BERT's post-norm layout through the deprecated mp_size
    torch.manual_seed(0)
    ref = BertLike()
    e = ds_all.init_inference(copy.deepcopy(ref), dtype="fp32", mp_size=2)
    sa = e.module.encoder.layer[0].attention.self
    assert (sa.num_attention_heads, sa.all_head_size, sa.query.weight.shape[0]) == (2, 8, 8)
    with torch.no_grad():
        out["bert"] = _diff(e(x), ref(x))

    # names no rule recognises: refused by the parser, split by an injection_policy
    torch.manual_seed(0)
    ref = PlainLike()
    try:
        ds_all.init_inference(copy.deepcopy(ref), dtype="fp32", tp={"tp_size": 2})
        raise AssertionError("the parser should refuse PlainLike")
    except ConfigError as err:
        assert "injection_policy" in str(err)
    e = ds_all.init_inference(copy.deepcopy(ref), dtype="fp32", tp={"tp_size": 2},
                              injection_policy={PlainLayer: ("attn.wo", "ffn.w_out")})  # fmt: skip
    assert (
        e.module.blocks[0].ffn.w_out.weight.shape == (16, 24)
        and e.module.blocks[0].attn.n_heads == 2
    )
    with torch.no_grad():
        out["injection_policy"] = _diff(e(x), ref(x))

    # a meta-built model filled from the checkpoint, then split; the tied head stays tied
    torch.manual_seed(CKPT_SEED)
    ref = LlamaLike(tied=True)
    with torch.device("meta"):
        meta = LlamaLike(tied=True)
    e = ds_all.init_inference(meta, config={"dtype": "fp32", "checkpoint": ckpt}, mp_size=2)
    assert e.module.lm_head.weight is e.module.embed_tokens.weight
    with torch.no_grad():
        out["checkpoint"] = _diff(e(x), ref(x))

    # the group given as tp_group, or by an mpu (which sets tp_size)
    torch.manual_seed(0)
    ref = LlamaLike(layers=1)
    e = ds_all.init_inference(copy.deepcopy(ref), dtype="fp32",
                              tensor_parallel={"tp_size": 2, "tp_group": dist.group.WORLD})  # fmt: skip
    assert e.mp_group is dist.group.WORLD
    with torch.no_grad():
        out["tp_group"] = _diff(e(x), ref(x))
    e = ds_all.init_inference(copy.deepcopy(ref), dtype="fp32", mpu=_MPU())
    assert e._config.tensor_parallel.tp_size == 2 and e.mp_group is dist.group.WORLD
    with torch.no_grad():
        out["mpu"] = _diff(e(x), ref(x))

    # every rank leaves with the random state of the group's first rank
    torch.manual_seed(100 + dist.get_rank())
    ds_all.init_inference(LlamaLike(layers=1), dtype="fp32", tensor_parallel={"tp_size": 2})
    draws = [None, None]
    dist.all_gather_object(draws, torch.rand(4))
    out["same_random_state"] = bool(torch.equal(draws[0], draws[1]))

    # sizes that two ranks cannot share, and a tp_size larger than the world, are refused
    out["refused"] = []
    for kwargs in ({"tensor_parallel": {"tp_size": 2}, "_model": LlamaLike(h=12, heads=3)},
                   {"tensor_parallel": {"tp_size": 4}}):  # fmt: skip
        model = kwargs.pop("_model", LlamaLike(layers=1))
        try:
            ds_all.init_inference(model, dtype="fp32", **kwargs)
        except ConfigError as err:
            out["refused"].append(str(err))

    out.update(_hf_llama())
    return out


def _hf_llama() -> dict[str, Any]:
    try:
        import transformers
    except ImportError:
        return {}
    import torch.distributed as dist

    import ds_all

    out: dict[str, Any] = {}
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(tiny_llama_config()).eval()
    torch.manual_seed(7 + dist.get_rank())  # init_inference must make the ranks agree
    e = ds_all.init_inference(
        copy.deepcopy(ref), dtype=torch.float32, tensor_parallel={"tp_size": 2}
    )
    assert e.module.model.layers[0].self_attn.q_proj.weight.shape == (16, 32)
    x = ids(2)
    mask = torch.ones_like(x)
    with torch.no_grad():
        out["hf_logits"] = _diff(e(input_ids=x, attention_mask=mask).logits,
                                 ref(input_ids=x, attention_mask=mask).logits)  # fmt: skip
        greedy = dict(input_ids=x, attention_mask=mask, max_new_tokens=4, do_sample=False)
        out["hf_greedy"] = bool(torch.equal(e.generate(**greedy), ref.generate(**greedy)))
        sampled = e.generate(input_ids=x, attention_mask=mask, max_new_tokens=4, do_sample=True)
    both = [None, None]
    dist.all_gather_object(both, sampled)
    out["hf_sampled_same"] = bool(torch.equal(both[0], both[1]))
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, Any]]:
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("inference_ckpt")
    torch.manual_seed(CKPT_SEED)
    state = LlamaLike(tied=True).state_dict()
    del state["lm_head.weight"]  # tied to embed_tokens.weight: stored once
    save_file(state, str(root / "model.safetensors"))
    desc = {"type": "ds_model", "checkpoints": ["model.safetensors"], "version": 1.0,
            "base_dir": str(root)}  # fmt: skip
    (root / "ckpt.json").write_text(json.dumps(desc))
    # gloo ranks on the CPU accelerator, on any machine
    return run_distributed(
        _rank_main, 2, args=(str(root / "ckpt.json"),), timeout=180,
        env={"DS_ACCELERATOR": "cpu"},
    )  # fmt: skip


@pytest.mark.parametrize(
    "case", ["llama", "bert", "injection_policy", "checkpoint", "tp_group", "mpu"]
)
def test_tp2_outputs_equal_one_process(ranks: list[dict[str, Any]], case: str) -> None:
    for out in ranks:
        assert out[case] < TOL, (case, out[case])


def test_tp2_generate_random_state_and_refusals(ranks: list[dict[str, Any]]) -> None:
    for out in ranks:
        assert out["llama_generate"] and out["same_random_state"]
        heads, world = out["refused"]
        assert heads.startswith("tensor_parallel.tp_size 2:") and "num_heads" in heads
        assert "tensor_parallel.tp_size" in world and "does not divide the world size 2" in world


def test_tp2_transformers_llama(ranks: list[dict[str, Any]]) -> None:
    pytest.importorskip("transformers")
    for out in ranks:
        assert out["hf_logits"] < TOL, out["hf_logits"]
        assert out["hf_greedy"] and out["hf_sampled_same"]
