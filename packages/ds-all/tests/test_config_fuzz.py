"""Property: any JSON value at any known key either loads or is a ConfigError, and a config that
loads builds its optimizer and schedule without an error from torch (no TypeError, IndexError
or ValueError from inside an optimizer or a schedule, no NaN learning rate)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("hypothesis")  # the test extra installs it

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ds_all import ConfigError, DeepSpeedConfig  # noqa: E402
from ds_all._optimizers import build_optimizer  # noqa: E402
from ds_all._schedulers import build_scheduler  # noqa: E402

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3000),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from(["auto", "0.001", "", "log", "linear", "cpu", "none"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=2)
    ),
    max_leaves=4,
)

TOP = ["train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
       "steps_per_print", "gradient_clipping", "gradient_predivide_factor", "seed",
       "prescale_gradients", "wall_clock_breakdown", "communication_data_type"]  # fmt: skip
SECTIONS = {
    "fp16": ["enabled", "loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis",
             "min_loss_scale"],
    "fault_tolerance": ["comms_timeout", "heartbeat_interval", "watchdog"],
    "zero_optimization": ["stage", "reduce_bucket_size", "allgather_bucket_size",
                          "stage3_max_live_parameters", "overlap_comm"],
    "csv_monitor": ["enabled", "job_name"],
    "activation_checkpointing": ["number_checkpoints", "partition_activations"],
}  # fmt: skip
OPTIMIZERS = {
    "AdamW": ["lr", "betas", "eps", "weight_decay", "amsgrad"],
    "Adam": ["lr", "betas", "adam_w_mode", "bias_correction"],
    "Lamb": ["lr", "betas", "max_coeff", "min_coeff"],
    "Lion": ["lr", "betas", "weight_decay"],
    "Adagrad": ["lr", "lr_decay", "initial_accumulator_value", "eps"],
    "SGD": ["lr", "momentum", "dampening", "nesterov"],
}
SCHEDULES = {
    "WarmupLR": ["warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type"],
    "WarmupDecayLR": ["total_num_steps", "warmup_num_steps", "warmup_max_lr"],
    "WarmupCosineLR": ["total_num_steps", "warmup_num_steps", "cos_min_ratio", "warmup_min_ratio"],
    "OneCycle": ["cycle_min_lr", "cycle_max_lr", "cycle_first_step_size", "decay_step_size",
                 "decay_lr_rate", "cycle_min_mom", "cycle_max_mom"],
    "LRRangeTest": ["lr_range_test_min_lr", "lr_range_test_step_size", "lr_range_test_step_rate"],
}  # fmt: skip
SCHEDULE_BASE = {
    "WarmupDecayLR": {"total_num_steps": 20},
    "WarmupCosineLR": {"total_num_steps": 20},
    "OneCycle": {"cycle_min_lr": 0.001, "cycle_max_lr": 0.01},
}


@st.composite
def configs(draw):
    cfg: dict = {"train_micro_batch_size_per_gpu": 1}
    opt = draw(st.sampled_from(sorted(OPTIMIZERS)))
    sched = draw(st.sampled_from(sorted(SCHEDULES)))
    cfg["optimizer"] = {"type": opt, "params": {"lr": 0.01}}
    cfg["scheduler"] = {"type": sched, "params": dict(SCHEDULE_BASE.get(sched, {}))}
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["top", "section", "optimizer", "scheduler"]))
        value = draw(VALUES)
        if where == "top":
            cfg[draw(st.sampled_from(TOP))] = value
        elif where == "section":
            name = draw(st.sampled_from(sorted(SECTIONS)))
            cfg.setdefault(name, {})[draw(st.sampled_from(SECTIONS[name]))] = value
        elif where == "optimizer":
            cfg["optimizer"]["params"][draw(st.sampled_from(OPTIMIZERS[opt]))] = value
        else:
            cfg["scheduler"]["params"][draw(st.sampled_from(SCHEDULES[sched]))] = value
    return cfg


@pytest.mark.filterwarnings("ignore")
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_any_value_loads_or_is_a_config_error_and_loaded_ones_build(cfg):
    try:
        loaded = DeepSpeedConfig.load(cfg, require_resolved=True)
    except ConfigError:
        return
    params = [torch.nn.Parameter(torch.ones(2))]
    opt = build_optimizer(loaded.optimizer.type, loaded.optimizer.params, params, "cpu")
    sched = build_scheduler(loaded.scheduler.type, opt, loaded.scheduler.params)
    for _ in range(3):
        sched.step()
        assert all(math.isfinite(float(g["lr"])) and float(g["lr"]) >= 0 for g in opt.param_groups)
    assert loaded.steps_per_print >= 1
    assert math.isfinite(loaded.gradient_clipping) and loaded.gradient_clipping >= 0
