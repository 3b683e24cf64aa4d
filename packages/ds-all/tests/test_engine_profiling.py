"""The flops_profiler section, the TFLOP/s and MFU of the throughput line, and the autotuning
probe an autotuning trial runs (single process)."""

from __future__ import annotations

import json
import logging
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from _models import TinyGPT, batch  # noqa: E402

import ds_all  # noqa: E402
from ds_all._config_base import ConfigError  # noqa: E402

MICRO, SEQ, D, VOCAB, LAYERS = 4, 8, 32, 48, 2


def _fwd_macs() -> int:
    tokens = MICRO * SEQ
    return tokens * (LAYERS * 2 * D * 4 * D + D * VOCAB)


def _config(**extra):
    cfg = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}  # fmt: skip
    cfg.update(extra)
    return cfg


def _engine(cfg):
    torch.manual_seed(0)
    engine, *_ = ds_all.initialize(model=TinyGPT(), config=cfg, dist_init_required=False)
    return engine


def _steps(engine, n):
    for step in range(n):
        x, y = batch(step, MICRO)
        engine.backward(engine(x, y))
        engine.step()


def test_profile_printed_at_profile_step(tmp_path):
    out = tmp_path / "prof" / "flops.txt"
    engine = _engine(_config(flops_profiler={"enabled": True, "profile_step": 2, "module_depth": -1,
                                             "top_modules": 1, "detailed": True, "output_file": str(out)}))  # fmt: skip
    _steps(engine, 2)
    assert not out.exists()  # profiled during step 2, printed at its end
    _steps(engine, 1)
    text = out.read_text()
    assert "Profile Summary at step 3:" in text
    assert "fwd MACs per GPU:" in text and "bwd flops per GPU (measured):" in text
    assert "world size: " in text and "batch size per GPU: " in text
    assert engine._profiling.fwd_flops is not None
    # nothing left installed after the profiled step
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in engine.module.modules())


def test_profile_step_zero_profiles_the_first_step(tmp_path):
    """DeepSpeed accepts profile_step 0 (the first step: global_steps is 0 until the first
    optimizer step) and top_modules 0."""
    out = tmp_path / "flops.txt"
    engine = _engine(_config(flops_profiler={"enabled": True, "profile_step": 0, "top_modules": 0,
                                             "output_file": str(out)}))  # fmt: skip
    _steps(engine, 1)
    assert "Profile Summary at step 1:" in out.read_text()
    with pytest.raises(ConfigError, match="flops_profiler.profile_step must be at least 0"):
        _engine(_config(flops_profiler={"profile_step": -1}))


def test_flops_profiler_turns_timers_on():
    """DeepSpeed's config ORs wall_clock_breakdown with flops_profiler.enabled."""
    assert not _engine(_config()).timers.enabled
    engine = _engine(_config(flops_profiler={"enabled": True, "profile_step": 5}))
    assert engine.timers.enabled and engine.wall_clock_breakdown() is True
    assert _engine(_config(wall_clock_breakdown=True)).timers.enabled
    _steps(engine, 1)
    assert engine.timers.counts.get("forward")  # the summary's fwd/bwd/step latencies


def test_deepspeed_profiling_accessors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    engine = _engine(_config())
    assert engine.flops_profiler_enabled() is False and engine.wall_clock_breakdown() is False
    assert not hasattr(engine, "flops_profiler")  # DeepSpeed creates it only when enabled
    assert (engine.flops_profiler_recompute_fwd_factor(), engine.flops_profiler_profile_step(),
            engine.flops_profiler_module_depth(), engine.flops_profiler_top_modules(),
            engine.flops_profiler_detailed(), engine.flops_profiler_output_file()) == (
            0.0, 1, -1, 1, True, None)  # fmt: skip
    assert engine.autotuning_enabled() is False
    assert (engine.autotuning_start_profile_step(), engine.autotuning_end_profile_step()) == (3, 5)
    assert engine.autotuning_metric() == "throughput"
    assert engine.autotuning_metric_path() == str(tmp_path / "autotuning_metric.json")
    assert engine.autotuning_model_info_path() == str(tmp_path / "autotuning_model_info.json")
    assert engine.autotuning_profile_model_info() is False

    fp = {"enabled": True, "recompute_fwd_factor": 0.5, "profile_step": 4, "module_depth": 2,
          "top_modules": 3, "detailed": False, "output_file": "p.txt"}  # fmt: skip
    engine = _engine(_config(flops_profiler=fp))
    from ds_profile import FlopsProfiler

    assert isinstance(engine.flops_profiler, FlopsProfiler)
    assert engine.flops_profiler.model is engine.module
    assert (engine.flops_profiler_recompute_fwd_factor(), engine.flops_profiler_profile_step(),
            engine.flops_profiler_module_depth(), engine.flops_profiler_top_modules(),
            engine.flops_profiler_detailed(), engine.flops_profiler_output_file()) == (
            0.5, 4, 2, 3, False, "p.txt")  # fmt: skip

    # autotuning on: DeepSpeed's profiler is on, at start_profile_step, not detailed
    at = {"enabled": True, "start_profile_step": 2, "end_profile_step": 4, "metric": "latency",
          "metric_path": "m.json", "model_info": {"profile": True}}  # fmt: skip
    engine = _engine(_config(autotuning=at, flops_profiler={"profile_step": 7}))
    assert engine.flops_profiler_enabled() is True and engine.autotuning_enabled() is True
    assert engine.flops_profiler_profile_step() == 2 and engine.flops_profiler_detailed() is False
    assert engine.autotuning_end_profile_step() == 4 and engine.autotuning_metric() == "latency"
    assert engine.autotuning_metric_path() == "m.json"
    assert engine.autotuning_profile_model_info() is True
    assert engine.wall_clock_breakdown() is False  # DeepSpeed ORs flops_profiler.enabled only


def test_throughput_line_has_tflops_and_mfu(caplog, monkeypatch):
    monkeypatch.setenv("DS_PEAK_FLOPS", "1e12")
    engine = _engine(_config(steps_per_print=2))
    with caplog.at_level(logging.INFO, logger="ds_all"):
        _steps(engine, 2)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("step 2"))
    assert "TFLOP/s/device" in line and "MFU " in line
    # forward FLOPs counted once: the products (2 per MAC) plus LayerNorm/GELU/softmax terms
    assert engine._profiling.fwd_flops >= 2 * _fwd_macs()


def test_mfu_left_out_without_a_known_peak(caplog, monkeypatch):
    monkeypatch.delenv("DS_PEAK_FLOPS", raising=False)
    engine = _engine(_config(steps_per_print=1))
    with caplog.at_level(logging.INFO, logger="ds_all"):
        _steps(engine, 1)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("step 1"))
    assert "TFLOP/s/device" in line and "MFU" not in line


def test_peak_from_config(caplog):
    engine = _engine(_config(steps_per_print=1, flops_profiler={"peak_tflops": 2.0}))
    assert engine._profiling.peak == 2e12


def test_config_errors():
    with pytest.raises(ConfigError, match="flops_profiler.recompute_fwd_factor"):
        _engine(_config(flops_profiler={"recompute_fwd_factor": 2}))
    with pytest.raises(ConfigError, match="flops_profiler.profile_stpe"):
        _engine(_config(flops_profiler={"profile_stpe": 2}))
    with pytest.raises(ConfigError, match="autotuning.end_profile_step"):
        _engine(_config(autotuning={"start_profile_step": 5, "end_profile_step": 5}))
    with pytest.raises(ConfigError, match="autotuning.metrc: unknown key; did you mean 'metric'"):
        _engine(_config(autotuning={"metrc": "latency"}))


def test_autotuning_deepspeed_keys_accepted():
    """DeepSpeed 0.19.8 accepts model_info null and start_step/end_step (no effect there):
    accepted, the no-op keys with a warning naming the keys that do set the profiled steps."""
    with pytest.warns(UserWarning, match="autotuning.start_step has no effect.*start_profile_step"):
        engine = _engine(_config(autotuning={"model_info": None, "start_step": 5, "end_step": 15}))
        assert engine.autotuning_start_profile_step() == 3
        assert not engine.autotuning_profile_model_info()
    with pytest.raises(ConfigError, match="autotuning.mp_size.*set autotuning.mp_size to 1"):
        _engine(_config(autotuning={"mp_size": 2}))


def test_autotuning_probe_writes_metric_and_exits(tmp_path):
    path = tmp_path / "m.json"
    engine = _engine(_config(autotuning={"enabled": True, "start_profile_step": 1, "end_profile_step": 3,
                                         "metric_path": str(path)}))  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        _steps(engine, 10)
    assert exc.value.code == 0 and engine.global_steps == 3
    metric = json.loads(path.read_text())
    assert metric["throughput"] == pytest.approx(MICRO / metric["latency"])
    assert metric["FLOPS_per_gpu"] > 0


def test_autotuning_model_info(tmp_path):
    path = tmp_path / "info.json"
    engine = _engine(_config(autotuning={"enabled": True, "model_info": {"profile": True},
                                         "model_info_path": str(path)}))  # fmt: skip
    with pytest.raises(SystemExit):
        _steps(engine, 3)
    assert engine.global_steps == 0 and engine.micro_steps == 0  # exits after the first forward
    info = json.loads(path.read_text())
    assert info["num_params"] == sum(p.numel() for p in TinyGPT().parameters())
    # at least the hidden states of each block's MLP are saved for backward, per sample
    assert info["activation_mem_per_gpu"] >= LAYERS * SEQ * 4 * D * 4
    assert info["device_memory_bytes"] > 0
