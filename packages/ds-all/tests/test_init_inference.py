"""init_inference in one process: DeepSpeed 0.19.8's config keys, aliases, defaults and
deprecated keys; how config and keyword arguments combine; every refusal naming its key and
leaving the model untouched; the engine's forward/generate/dtype/profiling; checkpoint
loading into a meta-built model; AutoTP's choice of row- and column-parallel layers."""

from __future__ import annotations

import copy
import json
import os
import sys
import warnings

import pytest
import torch
from torch import nn

import ds_all
from ds_all import ConfigError
from ds_all._config_base import validate_section
from ds_all.inference import DeepSpeedInferenceConfig, InferenceEngine
from ds_all.inference._autotp import Split, _specs, plan_autotp

sys.path.insert(0, os.path.dirname(__file__))

from _inference_models import BertLike, LlamaLayer, LlamaLike, PlainLayer, PlainLike, ids  # noqa: E402


def _cfg(data: dict) -> DeepSpeedInferenceConfig:
    return validate_section(DeepSpeedInferenceConfig, data)  # type: ignore[return-value]


# --------------------------------------------------------------------------- config
def test_defaults_are_deepspeeds() -> None:
    c = _cfg({})
    assert (c.dtype, c.replace_with_kernel_inject, c.enable_cuda_graph) == (
        torch.float16,
        False,
        False,
    )
    assert (c.tensor_parallel.tp_size, c.tensor_parallel.tp_grain_size) == (1, 64)
    assert c.tensor_parallel.enabled and c.tensor_parallel.mpu is None
    assert (c.triangular_masking, c.return_tuple, c.keep_module_on_host) == (True, True, False)
    assert (c.max_out_tokens, c.min_out_tokens, c.training_mp_size) == (1024, 1, 1)
    assert (c.checkpoint, c.base_dir, c.injection_policy, c.replace_method) == (
        None,
        "",
        None,
        "auto",
    )
    assert c.moe.enabled and c.moe.ep_size == 1 and c.moe.moe_experts == [1]
    d = ds_all.default_inference_config()
    assert d["dtype"] == "torch.float16" and d["tensor_parallel"]["tp_size"] == 1


def test_aliases_dtype_names_and_auto() -> None:
    c = _cfg({
        "kernel_inject": False, "tp": {"tp_size": 1}, "tm": True, "injection_dict": None,
        "args": {"hidden": 8}, "max_tokens": 7, "min_tokens": 1, "ckpt_config": {},
        "moe": {"num_experts": [1], "expert_group": None}, "dtype": "auto",
    })  # fmt: skip
    assert c.max_out_tokens == 7 and c.config == {"hidden": 8} and c.dtype == torch.float16
    for name, dtype in (("fp16", torch.float16), ("half", torch.float16), ("bfloat16", torch.bfloat16),
                        ("torch.float32", torch.float32), ("float", torch.float32), ("int8", torch.int8),
                        (torch.bfloat16, torch.bfloat16)):  # fmt: skip
        assert _cfg({"dtype": name}).dtype == dtype


def test_deprecated_keys_map_to_their_sections() -> None:
    mpu = object()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = _cfg({"mp_size": 2, "mpu": mpu, "ep_size": 1, "moe_type": "standard", "moe": False})
        assert _cfg({"mp_size": 2, "tp": {"tp_grain_size": 8}}).tensor_parallel.tp_size == 2
        _cfg({"replace_method": "auto"})
    assert c.tensor_parallel.tp_size == 2 and c.tensor_parallel.mpu is mpu
    assert c.moe.enabled is False and c.moe.ep_size == 1
    said = [str(w.message) for w in caught if w.category is DeprecationWarning]
    for old, new in (("mp_size", "tensor_parallel.tp_size"), ("mpu", "tensor_parallel.mpu"),
                     ("ep_size", "moe.ep_size"), ("moe_type", "moe.type")):  # fmt: skip
        assert f"config key {old!r} is deprecated; use '{new}'" in said
    assert any("replace_method" in m for m in said)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (
            {"mp_size": 2, "tensor_parallel": {"tp_size": 2}},
            "mp_size and its replacement tensor_parallel.tp_size",
        ),
        ({"ep_size": 2, "moe": {"ep_size": 2}}, "ep_size and its replacement moe.ep_size"),
        ({"tp_sise": 2}, "tp_sise: unknown key"),
        ({"tensor_parallel": {"size": 2}}, "tensor_parallel.size: unknown key"),
        ({"moe": {"experts": 2}}, "moe.experts: unknown key"),
        ({"dtype": "fp64"}, "dtype: 'fp64' is not a dtype name"),
        ({"dtype": 16}, "dtype: expected a torch.dtype"),
        ({"tensor_parallel": {"tp_size": 0}}, "tensor_parallel.tp_size must be >= 1"),
        ({"max_out_tokens": 0}, "max_out_tokens"),
        ({"tensor_parallel": {"tp_size": True}}, "tensor_parallel.tp_size: expected a number"),
    ],
)
def test_config_errors_name_the_key(data: dict, match: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(ConfigError, match=match):
            _cfg(data)


def test_config_sources_dict_file_and_kwargs(tmp_path) -> None:
    path = tmp_path / "inference.json"
    path.write_text(json.dumps({"dtype": "fp32", "max_tokens": 9}))
    e = ds_all.init_inference(nn.Linear(2, 2), config=str(path), return_tuple=True)
    assert e._config.max_out_tokens == 9 and e.module.weight.dtype == torch.float32
    given = {"dtype": torch.float32}
    e = ds_all.init_inference(nn.Linear(2, 2), config=given, dtype=torch.float32, max_out_tokens=5)
    assert e._config.max_out_tokens == 5 and given == {"dtype": torch.float32}  # not mutated
    with pytest.raises(ConfigError, match="dtype: torch.float32 in config but torch.float16"):
        ds_all.init_inference(nn.Linear(2, 2), config=given, dtype=torch.float16)
    with pytest.raises(ConfigError, match="config must be a dict or the path"):
        ds_all.init_inference(nn.Linear(2, 2), config=[("dtype", "fp32")])  # type: ignore[arg-type]
    assert isinstance(e, InferenceEngine) and ds_all.inference.InferenceEngine is InferenceEngine


# --------------------------------------------------------------------------- refusals
_REFUSED = [
    ({"replace_with_kernel_inject": True}, "replace_with_kernel_inject.*set it to false"),
    ({"kernel_inject": True}, "replace_with_kernel_inject \\(kernel_inject\\)"),
    ({"dtype": torch.int8}, "dtype int8.*use torch.float16"),
    ({"dtype": torch.float64}, "dtype torch.float64.*use one of them"),
    ({"use_triton": True}, "use_triton.*set it to false"),
    ({"triton_autotune": True}, "triton_autotune"),
    ({"set_empty_params": True}, "set_empty_params"),
    ({"transposed_mode": True}, "transposed_mode"),
    ({"tm": False}, "triangular_masking \\(tm\\).*remove it"),
    ({"return_tuple": False}, "return_tuple.*remove it"),
    ({"min_tokens": 4}, "min_out_tokens \\(min_tokens\\)"),
    ({"training_mp_size": 2}, "training_mp_size.*remove it"),
    ({"save_mp_checkpoint_path": "/tmp/x"}, "save_mp_checkpoint_path.*remove it"),
    ({"checkpoint_config": {"checkpoint_dir": "/tmp"}}, "checkpoint_config \\(ckpt_config\\)"),
    ({"zero": {"stage": 3}}, "zero: ZeRO is not applied.*ds_all.initialize"),
    ({"quant": {"enabled": True}}, "quant: quantized inference.*remove the section"),
    ({"moe": {"ep_size": 2}}, "moe.ep_size.*remove it"),
    ({"ep_size": 2}, "moe.ep_size.*deprecated top-level ep_size"),
    ({"moe_type": "residual"}, "moe.type.*moe_type"),
    ({"enable_cuda_graph": True}, "enable_cuda_graph: CUDA graphs need the cuda accelerator"),
    ({"tensor_parallel": {"enabled": False, "tp_size": 2}}, "tensor_parallel.enabled is false"),
    ({"injection_policy": {nn.Linear: "x"}, "injection_policy_tuple": ("x",)}, "keep only injection_policy"),
    ({"checkpoint": {"type": "Megatron", "checkpoints": ["a"], "version": 1.0}}, "type 'Megatron' is not supported"),
    ({"checkpoint": {"type": "ds_model", "checkpoints": {"tp": [], "non_tp": []}, "version": 1.0}}, "split for DeepSpeed's fused kernels"),
    ({"checkpoint": {"type": "ds_model", "checkpoints": ["missing.pt"]}, "base_dir": "/nonexistent"}, "weight file '/nonexistent/missing.pt' does not exist"),
    ({"injection_policy": {"LlamaLayer": ("self_attn.o_proj",)}}, "not an nn.Module class"),
    ({"injection_policy": {nn.Linear: ("0",)}}, "no Linear module below its top level"),
    ({"injection_policy": {nn.LayerNorm: ("attention.out",)}}, "no module of the model is named 'attention.out'"),
]  # fmt: skip


@pytest.mark.parametrize(("kwargs", "match"), _REFUSED)
def test_refusals_name_the_key_and_leave_the_model(kwargs: dict, match: str) -> None:
    if "enable_cuda_graph" in kwargs and ds_all.get_accelerator().device_name() == "cuda":
        pytest.skip("CUDA graphs are implemented on the cuda accelerator")
    model = LlamaLike(layers=1) if "injection_policy" not in kwargs else _linear_free()
    before = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(ConfigError, match=match):
            ds_all.init_inference(model, **kwargs)
    after = model.state_dict()
    if "injection_policy" not in kwargs and "checkpoint" not in kwargs:
        # refused before anything changed (dtype fp16 would have converted the weights)
        assert all(
            torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before
        )


def _linear_free() -> nn.Module:
    # a LayerNorm block, so a policy naming nn.Linear finds no instance below the top level
    return nn.Sequential(nn.LayerNorm(4))


def test_meta_model_without_checkpoint_is_refused() -> None:
    with torch.device("meta"):
        model = LlamaLike(layers=1)
    with pytest.raises(ConfigError, match="on the meta device; give checkpoint"):
        ds_all.init_inference(model, dtype=torch.float32)


# --------------------------------------------------------------------------- the engine
#: where the engine puts the model (the accelerator's current device); references run on CPU
DEV = ds_all.get_accelerator().current_device_name()
CLOSE = {"rtol": 1e-4, "atol": 1e-5}  # the same fp32 math, possibly on another device


def test_forward_dtype_and_device() -> None:
    torch.manual_seed(0)
    ref = LlamaLike()
    engine = ds_all.init_inference(copy.deepcopy(ref), dtype=torch.float32)
    x = ids()
    out = engine(x.to(DEV))
    torch.testing.assert_close(out.cpu(), ref(x), **CLOSE)
    assert torch.equal(engine.forward(x.to(DEV)), out)
    # as DeepSpeed's: the forward is not wrapped in no_grad
    assert out.requires_grad and engine.mp_group is None and engine.mpu is None
    assert next(engine.module.parameters()).device == torch.device(DEV)
    assert engine.config is None and engine.injection_dict is None
    for dtype, spelling in (
        (torch.float16, None),
        (torch.bfloat16, "bf16"),
        (torch.float16, "half"),
    ):
        kwargs = {} if spelling is None else {"dtype": spelling}  # None: DeepSpeed's default fp16
        e = ds_all.init_inference(copy.deepcopy(ref), **kwargs)
        assert {p.dtype for p in e.module.parameters()} == {dtype}
        with torch.no_grad():
            torch.testing.assert_close(e(x.to(DEV)).float().cpu(), ref(x), rtol=0.05, atol=0.05)


def test_generate_passes_through_and_checks_max_tokens() -> None:
    torch.manual_seed(0)
    ref = LlamaLike()
    engine = ds_all.init_inference(copy.deepcopy(ref), dtype="fp32", max_tokens=SEQ_LIMIT)
    x = ids()
    got = engine.generate(input_ids=x.to(DEV), max_new_tokens=2)
    assert torch.equal(got.cpu(), ref.generate(x, 2))
    assert torch.equal(engine.generate(x.to(DEV)).cpu(), ref.generate(x))
    with pytest.raises(RuntimeError, match="more than max_out_tokens"):
        engine.generate(input_ids=torch.zeros(1, SEQ_LIMIT + 1, dtype=torch.long))
    # DeepSpeed's engine has generate only when its model has
    assert not hasattr(ds_all.init_inference(nn.Linear(2, 2), dtype="fp32"), "generate")

    class Cached(LlamaLike):
        resets = 0

        def reset_cache(self) -> None:
            self.resets += 1

    cached = ds_all.init_inference(Cached(layers=1), dtype="fp32")
    cached.generate(input_ids=x.to(DEV), max_new_tokens=1)
    assert cached.module.resets == 1


SEQ_LIMIT = 8


def test_profile_model_time_and_config_attribute() -> None:
    engine = ds_all.init_inference(LlamaLike(layers=1), dtype="fp32", config={"args": {"a": 1}})
    with pytest.raises(RuntimeError, match="profile_model_time"):
        engine.model_times()
    engine.profile_model_time()
    engine(ids().to(DEV))
    engine(ids().to(DEV))
    times = engine.model_times()
    assert len(times) == 2 and all(t > 0 for t in times) and engine.model_times() == []
    assert engine.config == {"a": 1}


_cuda = pytest.mark.skipif(DEV == "cpu", reason="needs the cuda accelerator")


@pytest.mark.gpu
@_cuda
def test_keep_module_on_host() -> None:
    engine = ds_all.init_inference(LlamaLike(layers=1), dtype="fp32", keep_module_on_host=True)
    assert next(engine.module.parameters()).device.type == "cpu"


@pytest.mark.gpu
@_cuda
@pytest.mark.parametrize("grad", [False, True])
def test_cuda_graph_replays_the_forward(grad: bool) -> None:
    torch.manual_seed(0)
    ref = LlamaLike()
    engine = ds_all.init_inference(copy.deepcopy(ref), dtype="fp32", enable_cuda_graph=True)
    engine.profile_model_time()
    with torch.set_grad_enabled(grad):
        first = engine(ids(0).to(DEV))
        torch.testing.assert_close(first.cpu(), ref(ids(0)), **CLOSE)
        again = engine(ids(1).to(DEV))  # replayed on the new input, into the same output
        assert again is first
        torch.testing.assert_close(again.cpu(), ref(ids(1)), **CLOSE)
        with pytest.raises(ValueError, match="replays fixed shapes"):
            engine(ids(0, batch=3).to(DEV))
    assert len(engine.model_times()) == 2


# --------------------------------------------------------------------------- checkpoint
@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_checkpoint_fills_a_meta_model(tmp_path, fmt: str) -> None:
    torch.manual_seed(0)
    ref = LlamaLike(tied=True)
    state = {k: v for k, v in ref.state_dict().items() if k != "lm_head.weight"}  # tied: once
    half = len(state) // 2
    names = [f"part{i}.{fmt}" for i in range(2)]
    for name, part in zip(
        names, (dict(list(state.items())[:half]), dict(list(state.items())[half:]))
    ):
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(part, str(tmp_path / name))
        else:
            torch.save(part, tmp_path / name)
    desc = tmp_path / "checkpoints.json"
    desc.write_text(json.dumps({"type": "ds_model", "checkpoints": names, "version": 1.0}))
    with torch.device("meta"):
        model = LlamaLike(tied=True)
    engine = ds_all.init_inference(
        model, dtype=torch.float32, checkpoint=str(desc), base_dir=str(tmp_path)
    )
    m = engine.module
    assert m.lm_head.weight is m.embed_tokens.weight  # the tie survives materialization
    x = ids()
    torch.testing.assert_close(engine(x.to(DEV)).cpu(), ref(x), **CLOSE)
    # a checkpoint missing a weight of a meta model is refused, naming it
    with torch.device("meta"):
        model = LlamaLike(tied=True)
    with pytest.raises(
        ConfigError, match="built on the meta device and the checkpoint does not hold"
    ):
        ds_all.init_inference(model, dtype="fp32", base_dir=str(tmp_path),
                              checkpoint={"type": "ds_model", "checkpoints": names[:1], "version": 1})  # fmt: skip
    # a checkpoint of another model: the shapes differ
    with pytest.raises(ConfigError, match="has shape .* but the model's"):
        ds_all.init_inference(LlamaLike(h=8, heads=2), dtype="fp32", base_dir=str(tmp_path),
                              checkpoint={"type": "bloom", "checkpoints": names, "version": 1})  # fmt: skip


# --------------------------------------------------------------------------- AutoTP's plan
def test_parser_finds_the_row_parallel_layers() -> None:
    splits = plan_autotp(LlamaLike(), None, None, size=2).splits
    layer = {k.removeprefix("layers.0."): v for k, v in splits.items() if k.startswith("layers.0.")}
    assert layer == {
        "self_attn.q_proj": Split.COLUMN, "self_attn.k_proj": Split.COLUMN,
        "self_attn.v_proj": Split.COLUMN, "self_attn.o_proj": Split.ROW,
        "mlp.gate_proj": Split.COLUMN, "mlp.up_proj": Split.COLUMN, "mlp.down_proj": Split.ROW,
    }  # fmt: skip
    assert "lm_head" not in splits and len(splits) == 14
    # BERT: the linear layer before each LayerNorm
    bert = plan_autotp(BertLike(), None, None, size=2)
    rows = sorted(k for k, v in bert.splits.items() if v is Split.ROW and ".0." in k)
    assert rows == ["encoder.layer.0.attention.output.dense", "encoder.layer.0.output.dense"]
    assert bert.blocks == ["encoder.layer.0", "encoder.layer.1"]
    # nothing recognisable: refused, saying to name the layers with injection_policy
    with pytest.raises(ConfigError, match="found no layer to split in PlainLike.*injection_policy"):
        plan_autotp(PlainLike(), None, None, size=2)


def test_injection_policy_names_the_rows() -> None:
    plan = plan_autotp(PlainLike(), {PlainLayer: ("attn.wo", "ffn.w_out")}, None, size=2)
    assert (
        plan.splits["blocks.1.attn.wo"] is Split.ROW
        and plan.splits["blocks.1.ffn.w_in"] is Split.COLUMN
    )
    # a full relative path or DeepSpeed's ".name" of a direct child name the same layers
    assert (
        plan_autotp(PlainLike(), {PlainLayer: ["ffn.w_out", "wo"]}, None, size=2).splits
        == plan.splits
    )
    # injection_policy_tuple alone: the rows of the layers the parser finds
    assert plan_autotp(PlainLike(), None, ("attn.wo", "ffn.w_out"), size=2).splits == plan.splits
    with pytest.raises(ConfigError, match="names of the row-parallel linear layers"):
        plan_autotp(PlainLike(), {PlainLayer: object}, None, size=2)


def test_specs_cover_each_position_once() -> None:
    from ds_tp import PartitionType

    model = LlamaLike(layers=3)
    specs = _specs(model, plan_autotp(model, None, None, size=2).splits)
    assert len(specs) == 7  # one per position in the layer, whatever the depth
    assert {s.partition_type for s in specs} == {PartitionType.COLUMN, PartitionType.ROW}
    # a layer of another class at the same positions keeps the specs to exact names
    mixed = LlamaLike(layers=2)
    mixed.layers.append(OtherLayer(16, 4))
    plan = plan_autotp(mixed, {LlamaLayer: ("self_attn.o_proj", "mlp.down_proj")}, None, size=2)
    specs = _specs(mixed, plan.splits)
    assert len(specs) == 14 and not any(s.matches("layers.2.mlp.up_proj.weight") for s in specs)
    assert any(s.matches("layers.1.mlp.up_proj.weight") for s in specs)


class OtherLayer(LlamaLayer):
    pass


def test_fused_qkv_and_embedding_inside_a_layer_are_refused() -> None:
    model = LlamaLike(layers=1)
    model.layers[0].self_attn.qkv_proj = nn.Linear(16, 48)
    rows = {LlamaLayer: ("self_attn.o_proj", "mlp.down_proj")}
    with pytest.raises(ConfigError, match="qkv_proj is a fused q/k/v projection"):
        plan_autotp(model, rows, None, size=2)
    plan_autotp(model, rows, None, size=1)  # nothing is split at size 1: only checked
    model = LlamaLike(layers=1)
    model.layers[0].self_attn.rel_bias = nn.Embedding(8, 4)
    with pytest.raises(ConfigError, match="rel_bias is an embedding inside a layer"):
        plan_autotp(model, None, None, size=2)
