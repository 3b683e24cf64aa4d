"""Every config value validated with the key named: optimizer and scheduler params, NaN and
Infinity, booleans and quoted numbers for numbers, duplicate keys and nesting in files,
unresolved "auto", and output directories checked when initialize() starts. Where DeepSpeed
0.19.8 accepts a value on purpose (``steps_per_print: Infinity``, ``train_batch_size: 8.0``)
it is accepted here too."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os

import pytest
from torch import nn

import ds_all
from ds_all import ConfigError, DeepSpeedConfig

NAN, INF = float("nan"), float("inf")
BASE = {"train_micro_batch_size_per_gpu": 2}


def _cfg(**over):
    c = json.loads(json.dumps(BASE))
    c.update(over)
    return c


def _opt(type_: str = "AdamW", **params):
    return {"optimizer": {"type": type_, "params": params}}


def _sched(type_: str, **params):
    return {"scheduler": {"type": type_, "params": params}}


# (config override, the key the message must name, another fragment it must contain)
BAD = [
    # optimizer params, every type ds_all builds
    (_opt(lr=INF), "optimizer.params.lr", "finite"),
    (_opt(lr=NAN), "optimizer.params.lr", "finite"),
    (_opt(lr=-1e-3), "optimizer.params.lr", "[0, inf)"),
    (_opt(lr="0.001"), "optimizer.params.lr", "without quotes"),
    (_opt(lr=True), "optimizer.params.lr", "boolean"),
    (_opt(betas=[0.9]), "optimizer.params.betas", "list of 2 numbers"),
    (_opt(betas=0.9), "optimizer.params.betas", "list of 2 numbers"),
    (_opt(betas=[0.9, 1.0]), "optimizer.params.betas[1]", "[0, 1)"),
    (_opt(betas=[0.9, "0.99"]), "optimizer.params.betas[1]", "without quotes"),
    (_opt(eps=-1e-8), "optimizer.params.eps", "[0, inf)"),
    (_opt(eps=INF), "optimizer.params.eps", "finite"),
    (_opt(weight_decay=-0.01), "optimizer.params.weight_decay", "[0, inf)"),
    (_opt(amsgrad=1), "optimizer.params.amsgrad", "true or false"),
    (_opt("Adam", adam_w_mode="yes"), "optimizer.params.adam_w_mode", "true or false"),
    (_opt("Adam", bias_correction=False), "optimizer.params.bias_correction", "remove the key"),
    (_opt("Adam", lr=NAN), "optimizer.params.lr", "finite"),
    (_opt("Lamb", max_coeff=-1.0), "optimizer.params.max_coeff", "(0, inf)"),
    (_opt("Lamb", min_coeff=5.0, max_coeff=1.0), "optimizer.params.min_coeff", "swap"),
    (_opt("Lamb", betas=[0.9]), "optimizer.params.betas", "list of 2 numbers"),
    (_opt("Lion", lr=INF), "optimizer.params.lr", "finite"),
    (_opt("Lion", betas=[1.5, 0.99]), "optimizer.params.betas[0]", "[0, 1)"),
    (_opt("Adagrad", lr_decay=-1), "optimizer.params.lr_decay", "[0, inf)"),
    (
        _opt("Adagrad", initial_accumulator_value=NAN),
        "optimizer.params.initial_accumulator_value",
        "finite",
    ),
    (_opt("SGD", momentum=-0.9), "optimizer.params.momentum", "[0, inf)"),
    (_opt("SGD", nesterov="true"), "optimizer.params.nesterov", "true or false"),
    (_opt("OneBitAdam", freeze_step=2.5), "optimizer.params.freeze_step", "integer"),
    (_opt("OneBitAdam", freeze_step=True), "optimizer.params.freeze_step", "boolean"),
    (_opt("OneBitLamb", factor_min=4.0, factor_max=0.5), "optimizer.params.factor_min", "swap"),
    (_opt("ZeroOneAdam", var_update_scaler=0), "optimizer.params.var_update_scaler", "[1, inf)"),
    (_opt("AdamW", lrr=1e-3), "optimizer.params.lrr", "did you mean 'lr'"),
    ({"optimizer": {"type": "AdamWW"}}, "optimizer.type", "did you mean 'AdamW'"),
    # NaN / Infinity where a finite number is expected
    ({"gradient_clipping": NAN}, "gradient_clipping", "finite"),
    ({"gradient_clipping": INF}, "gradient_clipping", "finite"),
    ({"gradient_predivide_factor": NAN}, "gradient_predivide_factor", "finite"),
    ({"gradient_predivide_factor": 0}, "gradient_predivide_factor", "> 0"),
    ({"fault_tolerance": {"comms_timeout": NAN}}, "fault_tolerance.comms_timeout", "finite"),
    (
        {"fault_tolerance": {"heartbeat_interval": INF}},
        "fault_tolerance.heartbeat_interval",
        "finite",
    ),
    ({"fp16": {"loss_scale": NAN}}, "fp16.loss_scale", "finite"),
    ({"fp16": {"loss_scale": INF}}, "fp16.loss_scale", "finite"),
    ({"fp16": {"min_loss_scale": NAN}}, "fp16.min_loss_scale", "finite"),
    ({"steps_per_print": NAN}, "steps_per_print", "Infinity"),
    ({"steps_per_print": 0.5}, "steps_per_print", ">= 1"),
    (
        {"zero_optimization": {"stage": 2, "reduce_bucket_size": INF}},
        "zero_optimization.reduce_bucket_size",
        "finite",
    ),
    (
        {"zero_optimization": {"stage": 3, "stage3_max_live_parameters": NAN}},
        "zero_optimization.stage3_max_live_parameters",
        "finite",
    ),
    (
        {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "ratio": NAN}}},
        "zero_optimization.offload_optimizer.ratio",
        "finite",
    ),
    ({"aio": {"block_size": NAN}}, "aio.block_size", "finite"),
    (_sched("WarmupLR", warmup_max_lr=INF), "scheduler.params.warmup_max_lr", "finite"),
    (
        {"fault_tolerance": {"comms_timeout": 10, "heartbeat_interval": 30}},
        "fault_tolerance.heartbeat_interval",
        "less than",
    ),
    # booleans and quoted numbers are not numbers
    ({"train_batch_size": True}, "train_batch_size", "boolean"),
    ({"train_micro_batch_size_per_gpu": False}, "train_micro_batch_size_per_gpu", "boolean"),
    ({"gradient_accumulation_steps": True}, "gradient_accumulation_steps", "boolean"),
    ({"train_batch_size": "8"}, "train_batch_size", "without quotes"),
    ({"gradient_clipping": "1.0"}, "gradient_clipping", "without quotes"),
    ({"steps_per_print": True}, "steps_per_print", "boolean"),
    ({"seed": True}, "seed", "boolean"),
    ({"fp16": {"initial_scale_power": True}}, "fp16.initial_scale_power", "boolean"),
    (
        {"fault_tolerance": {"comms_timeout": "30"}},
        "fault_tolerance.comms_timeout",
        "without quotes",
    ),
    ({"zero_optimization": {"stage": True}}, "zero_optimization.stage", "boolean"),
    (
        {"zero_optimization": {"stage": 2, "reduce_bucket_size": "5e8"}},
        "zero_optimization.reduce_bucket_size",
        "without quotes",
    ),
    (
        {
            "zero_optimization": {
                "stage": 3,
                "offload_param": {"device": "cpu", "buffer_count": True},
            }
        },
        "zero_optimization.offload_param.buffer_count",
        "boolean",
    ),
    ({"train_batch_size": 8.5}, "train_batch_size", "fractional"),
    # scheduler params and contradictions
    (
        _sched("WarmupDecayLR", total_num_steps=5, warmup_num_steps=10),
        "scheduler.params.total_num_steps",
        "less than",
    ),
    (
        _sched("WarmupCosineLR", total_num_steps=5, warmup_num_steps=10),
        "scheduler.params.total_num_steps",
        "less than",
    ),
    (_sched("WarmupDecayLR", warmup_num_steps=10), "scheduler.params.total_num_steps", "required"),
    (
        _sched("WarmupLR", warmup_num_steps=0),
        "scheduler.params.warmup_num_steps",
        "positive integer",
    ),
    (
        _sched("WarmupLR", warmup_num_steps=8.0),
        "scheduler.params.warmup_num_steps",
        "positive integer",
    ),
    (
        _sched("WarmupLR", warmup_num_steps=True),
        "scheduler.params.warmup_num_steps",
        "positive integer",
    ),
    (_sched("WarmupLR", warmup_type="cosine"), "scheduler.params.warmup_type", "'log' or 'linear'"),
    (_sched("WarmupLR", warmup_min_lr="0"), "scheduler.params.warmup_min_lr", "without quotes"),
    (_sched("WarmupLR", warmup_min_lr=[0.0, -1.0]), "scheduler.params.warmup_min_lr[1]", ">= 0"),
    (
        _sched("WarmupCosineLR", total_num_steps=10, cos_min_ratio=1.5),
        "scheduler.params.cos_min_ratio",
        "[0, 1]",
    ),
    (
        _sched("WarmupCosineLR", total_num_steps=10, warmup_min_ratio=-0.1),
        "scheduler.params.warmup_min_ratio",
        "[0, 1]",
    ),
    (
        _sched("OneCycle", cycle_min_lr=0.1, cycle_max_lr=0.01),
        "scheduler.params.cycle_min_lr",
        "swap",
    ),
    (
        _sched(
            "OneCycle", cycle_min_lr=0.01, cycle_max_lr=0.1, cycle_min_mom=0.95, cycle_max_mom=0.85
        ),
        "scheduler.params.cycle_min_mom",
        "swap",
    ),
    (
        _sched("OneCycle", cycle_min_lr=0.01, cycle_max_lr=0.1, cycle_first_step_size=0),
        "scheduler.params.cycle_first_step_size",
        "> 0",
    ),
    (
        _sched("OneCycle", cycle_min_lr=0.01, cycle_max_lr=0.1, cycle_second_step_size=-5),
        "scheduler.params.cycle_second_step_size",
        ">= 0",
    ),
    (
        _sched("OneCycle", cycle_min_lr=0.01, cycle_max_lr=0.1, decay_lr_rate=0.1),
        "scheduler.params.decay_lr_rate",
        "decay_step_size",
    ),
    (_sched("OneCycle", cycle_max_lr=0.1), "scheduler.params.cycle_min_lr", "required"),
    (
        _sched("LRRangeTest", lr_range_test_min_lr=0.0),
        "scheduler.params.lr_range_test_min_lr",
        "> 0",
    ),
    (
        _sched("LRRangeTest", lr_range_test_step_size=0),
        "scheduler.params.lr_range_test_step_size",
        "positive integer",
    ),
    (
        _sched("LRRangeTest", lr_range_test_step_rate=-1.0),
        "scheduler.params.lr_range_test_step_rate",
        ">= 0",
    ),
    (
        _sched("LRRangeTest", lr_range_test_staircase=1),
        "scheduler.params.lr_range_test_staircase",
        "true or false",
    ),
    (_sched("WarmupLRR"), "scheduler.type", "did you mean 'WarmupLR'"),
    # sections we do not implement
    (
        {"fp16": {"enabled": True, "fp16_master_weights_and_grads": True}},
        "fp16.fp16_master_weights_and_grads",
        "not supported",
    ),
]


@pytest.mark.parametrize(
    "override, key, fragment", BAD, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)]
)
def test_bad_values_name_the_key(override, key, fragment):
    with pytest.raises(ConfigError) as e:
        DeepSpeedConfig.load(_cfg(**override))
    msg = str(e.value)
    assert key in msg and fragment in msg, msg


def test_bad_value_table_covers_every_optimizer_type_and_schedule():
    types = {o["optimizer"]["type"] for o, _, _ in BAD if "optimizer" in o}
    assert {"AdamW", "Adam", "Lamb", "Lion", "Adagrad", "SGD", "OneBitAdam", "OneBitLamb",
            "ZeroOneAdam"} <= types  # fmt: skip
    schedules = {o["scheduler"]["type"] for o, _, _ in BAD if "scheduler" in o}
    assert {"WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "OneCycle", "LRRangeTest"} <= schedules


# ------------------------------------------------------------------ what DeepSpeed accepts
@pytest.mark.parametrize(
    "value, expected",
    [(INF, math.inf), (None, math.inf), (2.5, 2.5), (2000.0, 2000), (7, 7)],
)
def test_steps_per_print_takes_what_deepspeed_and_accelerate_write(value, expected):
    cfg = DeepSpeedConfig.load(_cfg(steps_per_print=value))
    assert cfg.steps_per_print == expected
    # "never print": the engine's modulo test never hits
    assert all((step % cfg.steps_per_print == 0) == (expected != math.inf and step % expected == 0)
               for step in range(1, 50))  # fmt: skip


def test_steps_per_print_infinity_from_a_json_file(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text('{"train_micro_batch_size_per_gpu": 2, "steps_per_print": Infinity}')
    assert DeepSpeedConfig.load(str(p)).steps_per_print == math.inf


def test_integral_floats_are_integers_as_in_deepspeed():
    cfg = DeepSpeedConfig.load({"train_batch_size": 8.0, "train_micro_batch_size_per_gpu": 2.0,
                                "zero_optimization": {"stage": 2, "reduce_bucket_size": 5e8}})  # fmt: skip
    assert cfg.resolve_batch(2) == (8, 2, 2)
    assert isinstance(cfg.train_batch_size, int)
    assert cfg.zero_config().reduce_bucket_size == 500_000_000


def test_valid_params_of_every_optimizer_load():
    for override in [
        _opt("AdamW", lr=1e-3, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1),
        _opt("Adam", lr=1, adam_w_mode=False, torch_adam=True, bias_correction=True),
        _opt("Lamb", lr=1e-3, max_coeff=10.0, min_coeff=0.01),
        _opt("Lion", lr=1e-4, betas=(0.9, 0.99)),
        _opt("Adagrad", lr=0.01, eps=0),
        _opt("SGD", lr=0.1, momentum=0.9, nesterov=True),
        _opt("OneBitAdam", lr=1e-3, freeze_step=100.0),
        _opt("ZeroOneAdam", lr=1e-3, var_freeze_step=10),
    ]:
        DeepSpeedConfig.load(_cfg(**override))


# ------------------------------------------------------------------ files
def test_duplicate_keys_are_refused_naming_key_and_file(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text('{"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", '
                 '"params": {"lr": 0.1, "lr": 0.001}}}')  # fmt: skip
    with pytest.raises(ConfigError) as e:
        DeepSpeedConfig.load(str(p))
    assert "'optimizer.params.lr'" in str(e.value) and str(p) in str(e.value)
    p.write_text('{"train_micro_batch_size_per_gpu": 2, "train_micro_batch_size_per_gpu": 4}')
    with pytest.raises(
        ConfigError, match="'train_micro_batch_size_per_gpu' is given more than once"
    ):
        DeepSpeedConfig.load(str(p))


@pytest.mark.parametrize("depth", [40, 100_000])
def test_pathological_nesting_is_a_config_error(tmp_path, depth):
    p = tmp_path / "deep.json"
    p.write_text(
        '{"train_micro_batch_size_per_gpu": 2, "amp": ' + '{"a": ' * depth + "1" + "}" * depth + "}"
    )
    with pytest.raises(ConfigError, match="nested more than 32 levels"):
        DeepSpeedConfig.load(str(p))
    nested: dict = {}
    node = nested
    for _ in range(depth if depth < 5000 else 5000):
        node["a"] = {}
        node = node["a"]
    with pytest.raises(ConfigError, match="nested more than 32 levels"):
        DeepSpeedConfig.load({"train_micro_batch_size_per_gpu": 2, "amp": nested})


def test_a_file_that_is_not_an_object(tmp_path):
    p = tmp_path / "list.json"
    p.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        DeepSpeedConfig.load(str(p))


# ------------------------------------------------------------------ "auto"
HF_UNRESOLVED = {
    "fp16": {"enabled": "auto", "loss_scale": 0},
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "weight_decay": 0.0}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": "auto",
                                                       "warmup_num_steps": "auto",
                                                       "total_num_steps": "auto"}},
    "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto",
                          "stage3_prefetch_bucket_size": "auto"},
    "gradient_clipping": "auto",
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": 2,
}  # fmt: skip


def test_unresolved_auto_loads_for_zero_init_but_initialize_refuses_it():
    cfg = DeepSpeedConfig.load(HF_UNRESOLVED)  # what zero.Init sees before Trainer finalizes
    assert cfg.unresolved_auto == (
        "optimizer.params.lr", "optimizer.params.betas", "scheduler.params.warmup_max_lr",
        "scheduler.params.warmup_num_steps", "scheduler.params.total_num_steps",
        "gradient_clipping", "train_batch_size",
    )  # fmt: skip
    with pytest.raises(ConfigError) as e:
        DeepSpeedConfig.load(HF_UNRESOLVED, require_resolved=True)
    msg = str(e.value)
    assert "optimizer.params.lr" in msg and "gradient_clipping" in msg
    assert 'Trainer and Accelerate replace "auto"' in msg
    with pytest.raises(ConfigError, match='train_batch_size is "auto"'):
        ds_all.initialize(model=nn.Linear(2, 2), config={"train_batch_size": "auto",
                                                         "train_micro_batch_size_per_gpu": 1})  # fmt: skip


def test_auto_in_deepspeeds_pydantic_sections_is_the_default():
    cfg = DeepSpeedConfig.load(
        {**BASE, "fp16": {"enabled": "auto"}, "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"},
         "tensorboard": {"enabled": "auto"}, "pipeline": {"stages": "auto"}},
        require_resolved=True,
    )  # fmt: skip
    assert cfg.fp16.enabled is False and cfg.tensorboard.enabled is False
    assert cfg.zero_config().reduce_bucket_size == 50_000_000 and cfg.pipeline.stages == "auto"


def test_what_accelerate_and_trainer_write_is_accepted():
    """The keys Accelerate 1.x's DeepSpeedPlugin and Trainer's HfTrainerDeepSpeedConfig write
    after resolving "auto" (accelerate/utils/dataclasses.py, accelerator.py
    _prepare_deepspeed, transformers/integrations/deepspeed.py)."""
    cfg = DeepSpeedConfig.load(
        {
            "train_batch_size": 8, "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
            "steps_per_print": INF, "zero_allow_untested_optimizer": True,
            "fp16": {"enabled": False, "auto_cast": True}, "bf16": {"enabled": False},
            "zero_optimization": {
                "stage": 3, "stage3_gather_16bit_weights_on_model_save": True,
                "offload_optimizer": {"device": "none", "nvme_path": None},
                "offload_param": {"device": "none", "nvme_path": None},
                "reduce_bucket_size": 1024, "stage3_prefetch_bucket_size": 921,
                "stage3_param_persistence_threshold": 320,
            },
            "optimizer": {"type": "AdamW", "params": {"lr": 5e-5, "betas": [0.9, 0.999],
                                                      "eps": 1e-8, "weight_decay": 0.0}},
            "scheduler": {"type": "WarmupDecayLR", "params": {
                "warmup_min_lr": 0, "warmup_max_lr": 5e-5, "warmup_num_steps": 1,
                "total_num_steps": 10}},
            "checkpoint": {"use_node_local_storage": False},
        },
        require_resolved=True,
    )  # fmt: skip
    assert cfg.steps_per_print == math.inf and cfg.gradient_clipping == 1.0
    assert cfg.resolve_batch(2) == (8, 2, 2)


# ------------------------------------------------------------------ output directories
def _model_and_config(**extra):
    return nn.Linear(4, 2), {
        "train_micro_batch_size_per_gpu": 1,
        "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
        **extra,
    }


@pytest.mark.parametrize(
    "section, key",
    [
        (
            {"csv_monitor": {"enabled": True, "output_path": "{blocker}/logs"}},
            "csv_monitor.output_path",
        ),
        (
            {"tensorboard": {"enabled": True, "output_path": "{blocker}/tb"}},
            "tensorboard.output_path",
        ),
        (
            {"checkpoint": {"save_dir": "{blocker}/ckpt", "auto_resume": True}},
            "checkpoint.save_dir",
        ),
        ({"checkpoint": {"save_dir": "{blocker}", "save_on_signal": True}}, "checkpoint.save_dir"),
    ],
)
def test_output_dirs_blocked_by_a_file_are_config_errors(tmp_path, section, key):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    section = json.loads(json.dumps(section).replace("{blocker}", str(blocker)))
    model, config = _model_and_config(**section)
    with pytest.raises(ConfigError) as e:
        ds_all.initialize(model=model, config=config)
    assert key in str(e.value) and str(blocker) in str(e.value), str(e.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_output_dir_is_a_config_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    model, config = _model_and_config(csv_monitor={"enabled": True, "output_path": str(ro / "x")})
    with pytest.raises(ConfigError, match="csv_monitor.output_path.*not writable"):
        ds_all.initialize(model=model, config=config)


def test_unwritable_check_uses_access_rights(tmp_path, monkeypatch):
    """The permission branch, also where the tests run as root (access() always grants root)."""
    from ds_all import _paths

    monkeypatch.setattr(_paths.os, "access", lambda path, mode: False)
    with pytest.raises(ConfigError, match="checkpoint.save_dir.*not writable"):
        _paths.check_output_dir(tmp_path / "ckpt", "checkpoint.save_dir")


def test_csv_monitor_directory_is_created(tmp_path):
    model, config = _model_and_config(
        csv_monitor={
            "enabled": True,
            "output_path": str(tmp_path / "new" / "logs"),
            "job_name": "j",
        }
    )
    engine, *_ = ds_all.initialize(model=model, config=config)
    assert (tmp_path / "new" / "logs" / "j").is_dir()
    engine.close()


# ------------------------------------------------------------------ the clients' own config passes
HF_TEMPLATE = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16, "hysteresis": 2},
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                              "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                       "warmup_num_steps": "auto",
                                                       "total_num_steps": "auto"}},
    "zero_optimization": {"stage": 3, "overlap_comm": True, "sub_group_size": 1e9,
                          "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto",
                          "stage3_max_live_parameters": 1e9,
                          "stage3_gather_16bit_weights_on_model_save": True},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": 2000,
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
}  # fmt: skip


@pytest.mark.filterwarnings("ignore")
def test_trainer_fills_every_auto_of_its_template(tmp_path):
    """Hugging Face's documented ZeRO-3 template through Trainer's own config passes: loadable
    between them (zero.Init time, scheduler steps still "auto"), resolved after them."""
    for dist in ("deepspeed", "accelerate"):  # transformers' Trainer checks both by metadata
        try:
            importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pytest.skip(f"needs the {dist!r} distribution (ds-deepspeed's test environment)")
    deepspeed = pytest.importorskip("transformers.integrations.deepspeed")
    transformers = pytest.importorskip("transformers")
    hf = deepspeed.HfTrainerDeepSpeedConfig(json.loads(json.dumps(HF_TEMPLATE)))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=1e-4, warmup_steps=3, max_steps=10, report_to=[], use_cpu=True,
    )  # fmt: skip
    hf.trainer_config_process(args)
    cfg = DeepSpeedConfig.load(hf.config)
    assert cfg.unresolved_auto == ("scheduler.params.warmup_num_steps",
                                   "scheduler.params.total_num_steps")  # fmt: skip
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    )
    hf.trainer_config_finalize(args, model, 10)
    cfg = DeepSpeedConfig.load(hf.config, require_resolved=True)
    assert cfg.optimizer.params["lr"] == 1e-4 and cfg.scheduler.params["total_num_steps"] == 10
    assert cfg.gradient_clipping == 1.0 and cfg.resolve_batch(1) == (4, 2, 2)
    assert cfg.zero_config().reduce_bucket_size == 32 * 32


@pytest.mark.filterwarnings("ignore")
def test_accelerate_plugin_config_resolves():
    """Accelerate's DeepSpeedPlugin writes steps_per_print Infinity and fills "auto" with
    what _prepare_deepspeed passes it."""
    utils = pytest.importorskip("accelerate.utils")
    plugin = utils.DeepSpeedPlugin(hf_ds_config={
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}},
        "gradient_accumulation_steps": 2, "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto", "gradient_clipping": "auto",
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}},
    })  # fmt: skip
    assert plugin.deepspeed_config["steps_per_print"] == math.inf
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu"):
        DeepSpeedConfig.load(plugin.deepspeed_config, require_resolved=True)
    plugin.deepspeed_config_process(must_match=False, **{
        "gradient_clipping": 1.0, "train_micro_batch_size_per_gpu": 2, "train_batch_size": 4,
        "zero_optimization.stage3_gather_16bit_weights_on_model_save": False,
        "optimizer.params.lr": 1e-3, "optimizer.params.weight_decay": 0.0,
    })  # fmt: skip
    cfg = DeepSpeedConfig.load(plugin.deepspeed_config, require_resolved=True)
    assert cfg.steps_per_print == math.inf and cfg.resolve_batch(1) == (4, 2, 2)
