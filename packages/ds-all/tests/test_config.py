"""The DeepSpeed-compatible config: the batch triangle, "auto" values, deprecated aliases, and a
corpus of bad configs each rejected with an error naming the key."""

from __future__ import annotations

import json
import math

import pytest

from ds_all import ConfigError, DeepSpeedConfig

BASE = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}


def _cfg(**over):
    c = json.loads(json.dumps(BASE))
    c.update(over)
    return c


@pytest.mark.parametrize(
    "given, world, expected",
    [
        (
            {
                "train_batch_size": 32,
                "train_micro_batch_size_per_gpu": 4,
                "gradient_accumulation_steps": 2,
            },
            4,
            (32, 4, 2),
        ),
        ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4}, 4, (32, 4, 2)),
        ({"train_batch_size": 32, "gradient_accumulation_steps": 2}, 4, (32, 4, 2)),
        ({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}, 4, (32, 4, 2)),
        ({"train_micro_batch_size_per_gpu": 4}, 3, (12, 4, 1)),
        ({"train_batch_size": 12}, 3, (12, 4, 1)),
        (
            {
                "train_batch_size": "auto",
                "train_micro_batch_size_per_gpu": 4,
                "gradient_accumulation_steps": "auto",
            },
            2,
            (8, 4, 1),
        ),
    ],
)
def test_batch_triangle(given, world, expected):
    cfg = DeepSpeedConfig.load(given)
    assert cfg.resolve_batch(world) == expected
    t, m, g = expected
    assert t == m * g * world


def test_inconsistent_triple_shows_the_arithmetic():
    cfg = DeepSpeedConfig.load(
        {
            "train_batch_size": 30,
            "train_micro_batch_size_per_gpu": 4,
            "gradient_accumulation_steps": 2,
        }
    )
    with pytest.raises(ConfigError) as e:
        cfg.resolve_batch(4)
    assert (
        "train_batch_size (30) must equal train_micro_batch_size_per_gpu (4) x gradient_accumulation_steps (2) x data-parallel size (4) = 32"
        in str(e.value)
    )


@pytest.mark.parametrize(
    "given, world, key",
    [
        ({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4}, 4, "not divisible"),
        ({"train_batch_size": 30, "gradient_accumulation_steps": 4}, 4, "not divisible"),
        ({"train_batch_size": 7}, 2, "not divisible by the data-parallel size"),
        ({}, 2, "set train_batch_size or train_micro_batch_size_per_gpu"),
    ],
)
def test_batch_errors(given, world, key):
    with pytest.raises(ConfigError, match=key):
        DeepSpeedConfig.load(given).resolve_batch(world)


def test_auto_values_take_defaults_and_hf_config_loads():
    hf = {
        "fp16": {
            "enabled": "auto",
            "loss_scale": 0,
            "loss_scale_window": 1000,
            "initial_scale_power": 16,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "bf16": {"enabled": "auto"},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        },
        "scheduler": {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": "auto",
                "warmup_max_lr": "auto",
                "warmup_num_steps": "auto",
            },
        },
        "zero_optimization": {
            "stage": 2,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_bucket_size": "auto",
            "allgather_bucket_size": 2e8,
        },
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "steps_per_print": 2000,
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "wall_clock_breakdown": False,
    }
    cfg = DeepSpeedConfig.load(hf)
    assert cfg.fp16.enabled is False and cfg.bf16.enabled is False
    assert cfg.optimizer.params == {} and cfg.scheduler.params == {}
    assert cfg.gradient_clipping == 1.0  # DeepSpeed 0.19.8's default
    assert cfg.zero_config() is not None


def test_file_loading(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(BASE))
    assert DeepSpeedConfig.load(str(p)).train_micro_batch_size_per_gpu == 2
    p.write_text("{ not json")
    with pytest.raises(ConfigError, match="is not valid JSON: line 1"):
        DeepSpeedConfig.load(str(p))
    with pytest.raises(ConfigError, match="does not exist"):
        DeepSpeedConfig.load(str(tmp_path / "missing.json"))


def test_deprecated_alias_warns():
    with pytest.warns(DeprecationWarning, match="'bfloat16' is deprecated; use 'bf16'"):
        cfg = DeepSpeedConfig.load(_cfg(bfloat16={"enabled": True}))
    assert cfg.bf16.enabled


def test_defaults_are_deepspeeds_documented_defaults():
    """An empty section means DeepSpeed 0.19.8's defaults (deepspeed/runtime/constants.py and
    its config models)."""
    cfg = DeepSpeedConfig.load({"train_micro_batch_size_per_gpu": 1, "fp16": {"enabled": True}})
    f = cfg.fp16
    assert (f.loss_scale, f.initial_scale_power, f.loss_scale_window) == (0.0, 16, 1000)
    assert (f.hysteresis, f.min_loss_scale, f.consecutive_hysteresis) == (2, 1.0, False)
    # DeepSpeed 0.19.8's code (its docs lag): no progress line, clipping at a global norm of 1
    assert cfg.steps_per_print == math.inf
    assert cfg.gradient_clipping == 1.0
    assert cfg.wall_clock_breakdown is False and cfg.bf16.enabled is False
    assert cfg.zero_config().stage == 0
    assert cfg.resolve_batch(1) == (1, 1, 1)  # gradient_accumulation_steps defaults to 1
    assert (cfg.tensorboard.enabled, cfg.tensorboard.job_name) == (False, "DeepSpeedJobName")
    assert (cfg.csv_monitor.enabled, cfg.comms_logger.enabled) == (False, False)
    ac = cfg.activation_checkpointing
    assert (ac.partition_activations, ac.cpu_checkpointing, ac.number_checkpoints) == (
        False,
        False,
        None,
    )


def _warns(data: dict, match: str) -> DeepSpeedConfig:
    with pytest.warns(DeprecationWarning, match=match):
        return DeepSpeedConfig.load(_cfg(**data))


def test_zero_optimization_true_is_a_deprecated_stage_1():
    cfg = _warns({"zero_optimization": True}, r'"zero_optimization": true is deprecated')
    assert cfg.zero_config().stage == 1
    assert _warns({"zero_optimization": False}, "deprecated").zero_config().stage == 0


def test_deprecated_zero_offload_flags_map_to_offload_sections():
    cfg = _warns(
        {"zero_optimization": {"stage": 2, "cpu_offload": True}},
        r"'zero_optimization.cpu_offload' is deprecated; use \"offload_optimizer\"",
    )
    assert cfg.zero_config().offload_optimizer == {"device": "cpu"}
    with pytest.warns(DeprecationWarning) as rec:
        cfg = DeepSpeedConfig.load(_cfg(zero_optimization={"stage": 3, "cpu_offload_param": True,
                                                           "cpu_offload_use_pin_memory": True}))  # fmt: skip
    assert {"cpu_offload_param", "cpu_offload_use_pin_memory"} <= {
        w.message.args[0].split("'")[1].split(".")[1] for w in rec
    }
    assert cfg.zero_config().offload_param == {"device": "cpu", "pin_memory": True}
    assert _warns({"zero_optimization": {"stage": 2, "cpu_offload": False}}, "cpu_offload")\
        .zero_config().offload_optimizer is None  # fmt: skip
    cfg = _warns(
        {"zero_optimization": {"stage": 3, "stage3_gather_fp16_weights_on_model_save": True}},
        "use 'stage3_gather_16bit_weights_on_model_save'",
    )
    assert cfg.zero_config().stage3_gather_16bit_weights_on_model_save is True


def test_ignored_known_sections_warn():
    with pytest.warns(UserWarning, match="memory_breakdown"):
        DeepSpeedConfig.load(_cfg(memory_breakdown=False))


@pytest.mark.parametrize(
    "key, value",
    [
        ("elasticity", {"enabled": False}),
        ("nebula", {"enabled": False}),
        ("compression_training", {}),
        ("quantize_training", {"enabled": False}),
        ("eigenvalue", {"enabled": False}),
        ("sparse_gradients", False),
        ("graph_harvesting", False),
    ],
)
def test_sections_deepspeed_removed_are_refused_whatever_their_value(key, value):
    # DeepSpeed 0.19.8 raises on these (features it removed); a leftover block is refused here
    # too, naming the key and the fix, even when it only disables the feature
    with pytest.raises(ConfigError, match=f"^{key}: .*removed.*remove the key"):
        DeepSpeedConfig.load(_cfg(**{key: value}))


# Each bad config and a fragment its error must contain (the offending key, and a fix where one
# exists). Thirty-plus cases, from typos to type errors to inconsistent sections.
BAD = [
    ({"train_batch_sise": 8}, "train_batch_sise: unknown key; did you mean 'train_batch_size'"),
    ({"gradient_acumulation_steps": 2}, "did you mean 'gradient_accumulation_steps'"),
    ({"steps_per_prnt": 5}, "did you mean 'steps_per_print'"),
    ({"gradient_clipping": -1.0}, "gradient_clipping must be >= 0"),
    ({"gradient_clipping": "lots"}, "gradient_clipping"),
    ({"train_batch_size": 0}, "train_batch_size must be a positive integer"),
    (
        {"train_micro_batch_size_per_gpu": -2},
        "train_micro_batch_size_per_gpu must be a positive integer",
    ),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be a positive integer"),
    ({"steps_per_print": 0}, "steps_per_print must be >= 1"),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "enable at most one"),
    ({"fp16": {"enabeld": True}}, "fp16.enabeld: unknown key; did you mean 'enabled'"),
    ({"fp16": {"initial_scale_power": 100}}, "fp16.initial_scale_power must be in 0..64"),
    ({"fp16": {"loss_scale_window": 0}}, "fp16.loss_scale_window must be >= 1"),
    ({"fp16": {"hysteresis": 0}}, "fp16.hysteresis must be >= 1"),
    ({"fp16": {"min_loss_scale": -1}}, "fp16.min_loss_scale must be > 0"),
    ({"fp16": True}, "fp16: expected a JSON object"),
    ({"bf16": {"enable": True}}, "bf16.enable: unknown key; did you mean 'enabled'"),
    ({"optimizer": {"params": {"lr": 1}}}, "optimizer.type"),
    (
        {"optimizer": {"type": "AdamW", "parms": {}}},
        "optimizer.parms: unknown key; did you mean 'params'",
    ),
    ({"optimizer": {"type": "AdamW", "params": "fast"}}, "optimizer.params"),
    ({"scheduler": {"params": {}}}, "scheduler.type"),
    (
        {"scheduler": {"type": "WarmupLR", "param": {}}},
        "scheduler.param: unknown key; did you mean 'params'",
    ),
    (
        {"tensorboard": {"enabled": True, "outputpath": "x"}},
        "tensorboard.outputpath: unknown key; did you mean 'output_path'",
    ),
    ({"csv_monitor": {"enabled": "sometimes"}}, "csv_monitor.enabled"),
    ({"comms_logger": {"enabeled": True}}, "comms_logger.enabeled: unknown key"),
    ({"checkpoint": {"tag_validation": "Maybe"}}, "checkpoint.tag_validation"),
    (
        {"checkpoint": {"auto_resum": True}},
        "checkpoint.auto_resum: unknown key; did you mean 'auto_resume'",
    ),
    ({"pipeline": {"schedule": "zigzag"}}, "pipeline.schedule"),
    ({"pipeline": {"stage": 2}}, "pipeline.stage: unknown key; did you mean 'stages'"),
    ({"activation_checkpointing": {"cpu_checkpoint": True}}, "did you mean 'cpu_checkpointing'"),
    ({"data_types": {"grad_accum_dtype": "fp8"}}, "data_types.grad_accum_dtype"),
    ({"communication_data_type": "int8"}, "communication_data_type"),
    ({"amp": {"enabled": True}}, "amp: NVIDIA apex AMP is not supported"),
    ({"zero_optimization": 3}, "zero_optimization: expected a JSON object"),
    (
        {"bfloat16": {"enabled": True}, "bf16": {"enabled": True}},
        "bfloat16 and its replacement bf16 are both set",
    ),
    ({"wandb": {"projetc": "x"}}, "wandb.projetc: unknown key; did you mean 'project'"),
    ({"fp16": {"min_loss_scale": 0}}, "fp16.min_loss_scale must be > 0"),
    ({"fp16": {"loss_scale": -1}}, "fp16.loss_scale must be >= 0 (0 = dynamic loss scaling)"),
    (
        {"zero_optimization": {"cpu_offload": True, "offload_optimizer": {"device": "cpu"}}},
        "zero_optimization.cpu_offload and its replacement zero_optimization.offload_optimizer",
    ),
    ({"zero_optimization": {"cpu_offload": "yes"}}, "zero_optimization.cpu_offload must be true"),
    (
        {"fault_tolerance": {"comms_timeout": 0}},
        "fault_tolerance.comms_timeout must be a positive number",
    ),
]


@pytest.mark.parametrize("override, message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_configs_name_the_key(override, message):
    bad = _cfg(**override)
    with pytest.raises(ConfigError) as e:
        DeepSpeedConfig.load(bad)
    assert message in str(e.value), str(e.value)


def test_corpus_is_large_enough():
    assert len(BAD) >= 30


def test_zero_section_errors_keep_the_path():
    with pytest.raises(ConfigError, match="zero_optimization"):
        DeepSpeedConfig.load(_cfg(zero_optimization={"stage": 7}))
    with pytest.raises(ConfigError, match="zero_optimization.*stag"):
        DeepSpeedConfig.load(_cfg(zero_optimization={"stag": 2}))


def test_data_parallel_size_key():
    # DeepSpeed's (dp, sp) mesh key; initialize() checks dp x sp == world size
    cfg = DeepSpeedConfig.load({"data_parallel_size": 2, "sequence_parallel_size": 2})
    assert cfg.data_parallel_size == 2
    assert DeepSpeedConfig.load({}).data_parallel_size is None
    with pytest.raises(ConfigError, match="data_parallel_size must be >= 1"):
        DeepSpeedConfig.load({"data_parallel_size": 0})
