"""Config sections: DeepSpeed names and defaults, errors that name the key."""

import pytest

from ds_offload import (
    AioConfig,
    AioOptions,
    OffloadDevice,
    OffloadOptimizerConfig,
    OffloadOptimizerOptions,
    OffloadParamConfig,
    OffloadParamOptions,
    _coerce,
)


def test_defaults_are_deepspeeds():
    aio = AioConfig()
    assert (aio.block_size, aio.queue_depth, aio.thread_count) == (1_048_576, 8, 1)
    assert (aio.single_submit, aio.overlap_events, aio.use_gds) == (False, True, False)
    opt = OffloadOptimizerConfig()
    assert opt.device is OffloadDevice.none and not opt.enabled
    assert (opt.buffer_count, opt.pin_memory, opt.fast_init, opt.ratio) == (4, True, False, 1.0)
    assert (opt.pipeline_read, opt.pipeline_write, opt.pipeline) == (False, False, False)
    assert (opt.super_offload, opt.cpuadam_cores_perc) == (False, 0.8)
    par = OffloadParamConfig()
    assert (par.buffer_count, par.buffer_size, par.max_in_cpu) == (5, 100_000_000, 1_000_000_000)
    assert par.pin_memory is True  # DeepSpeed 0.19.8 pins by default
    # the runtime options (used without pydantic) carry the same defaults
    assert OffloadOptimizerOptions().pin_memory and OffloadParamOptions().pin_memory
    assert OffloadOptimizerConfig().to_options() == OffloadOptimizerOptions()
    assert OffloadParamConfig().to_options() == OffloadParamOptions()


def test_deepspeed_json_sections_validate_unchanged(tmp_path):
    opt = OffloadOptimizerConfig.model_validate(
        {"device": "nvme", "nvme_path": str(tmp_path), "pin_memory": True, "buffer_count": 4,
         "fast_init": False, "pipeline_read": False, "pipeline_write": False, "ratio": 0.3}
    )  # fmt: skip
    assert opt.device is OffloadDevice.nvme and opt.ratio == 0.3
    assert opt.to_options().nvme_path == tmp_path
    aio = AioConfig.model_validate({"intra_op_parallelism": 4, "block_size": 262144})
    assert aio.thread_count == 4
    assert aio.to_options() == AioOptions(block_size=262144, thread_count=4)


@pytest.mark.parametrize(
    "cls,where,data,match",
    [
        (
            OffloadOptimizerConfig,
            "zero_optimization.offload_optimizer",
            {"device": "gpu"},
            r"offload_optimizer\.device",
        ),
        (
            OffloadOptimizerConfig,
            "zero_optimization.offload_optimizer",
            {"device": "cpu", "ratio": 2},
            r"offload_optimizer\.ratio",
        ),
        (
            OffloadOptimizerConfig,
            "zero_optimization.offload_optimizer",
            {"device": "nvme"},
            "nvme_path is not set",
        ),
        (
            OffloadOptimizerConfig,
            "zero_optimization.offload_optimizer",
            {"pin_memroy": True},
            r"offload_optimizer\.pin_memroy.*Extra",
        ),
        (
            OffloadParamConfig,
            "zero_optimization.offload_param",
            {"buffer_size": -1},
            r"offload_param\.buffer_size",
        ),
        (
            OffloadOptimizerConfig,
            "zero_optimization.offload_optimizer",
            {"pipeline": True},  # DeepSpeed 0.19.8 has only pipeline_read / pipeline_write
            r"offload_optimizer\.pipeline.*Extra",
        ),
        (
            OffloadOptimizerConfig,
            "zero_optimization.offload_optimizer",
            {"cpuadam_cores_perc": 1.5},
            r"offload_optimizer\.cpuadam_cores_perc",
        ),
        (AioConfig, "aio", {"queue_depth": -1}, r"aio\.queue_depth"),
        (AioConfig, "aio", {"use_gds": True}, "GPUDirect"),
    ],
)
def test_errors_name_the_key(cls, where, data, match):
    with pytest.raises(ValueError, match=match):
        cls.from_dict(data, where)


@pytest.mark.parametrize("pydantic", [True, False])
def test_auto_means_the_default(pydantic, monkeypatch):
    # DeepSpeed's pydantic offload sections drop "auto" values (Hugging Face writes them);
    # offload_optimizer.ratio "auto" stays ours (chosen from the free device memory)
    if not pydantic:
        monkeypatch.setattr(_coerce, "_config", None)
    opt = _coerce.coerce(
        OffloadOptimizerOptions,
        {"device": "auto", "buffer_count": "auto", "pin_memory": "auto", "nvme_path": "auto",
         "fast_init": "auto", "super_offload": "auto", "ratio": "auto"},
        "zero_optimization.offload_optimizer",
    )  # fmt: skip
    assert opt == OffloadOptimizerOptions(ratio="auto")
    assert opt.nvme_path is None  # not a directory named "auto"
    par = _coerce.coerce(
        OffloadParamOptions,
        {"device": "cpu", "buffer_count": "auto", "buffer_size": "auto", "max_in_cpu": "auto",
         "pin_memory": "auto"},
        "zero_optimization.offload_param",
    )  # fmt: skip
    assert par == OffloadParamOptions(device=OffloadDevice.cpu)


@pytest.mark.parametrize("pydantic", [True, False])
def test_param_buffers_may_be_zero_as_in_deepspeed(pydantic, monkeypatch, tmp_path):
    # DeepSpeed accepts buffer_count / buffer_size >= 0; they matter only with device nvme
    if not pydantic:
        monkeypatch.setattr(_coerce, "_config", None)
    where = "zero_optimization.offload_param"
    par = _coerce.coerce(OffloadParamOptions, {"buffer_count": 0, "buffer_size": 0}, where)
    assert (par.buffer_count, par.buffer_size) == (0, 0)
    nvme = {"device": "nvme", "nvme_path": str(tmp_path), "buffer_size": 0}
    assert _coerce.coerce(OffloadParamOptions, nvme, where).buffer_size == 0
    with pytest.raises(ValueError, match=r"offload_param\.buffer_count.*at least 1"):
        _coerce.coerce(OffloadParamOptions, {**nvme, "buffer_count": 0}, where)


def test_deepspeed_keys_at_non_default_values(tmp_path):
    opt = OffloadOptimizerConfig.model_validate(
        {"device": "nvme", "nvme_path": str(tmp_path), "buffer_count": 8, "pin_memory": False,
         "pipeline_read": True, "pipeline_write": False, "fast_init": True, "ratio": 0.0,
         "super_offload": True, "cpuadam_cores_perc": 0.5}
    ).to_options()  # fmt: skip
    assert (opt.buffer_count, opt.pin_memory, opt.fast_init, opt.ratio) == (8, False, True, 0.0)
    assert (opt.pipeline_read, opt.super_offload, opt.cpuadam_cores_perc) == (True, True, 0.5)
    assert OffloadOptimizerConfig(pipeline_write=True).pipeline
    par = OffloadParamConfig.model_validate(
        {"device": "nvme", "nvme_path": str(tmp_path), "buffer_count": 3, "buffer_size": 1e6,
         "max_in_cpu": 0, "pin_memory": False}
    ).to_options()  # fmt: skip
    assert (par.buffer_count, par.buffer_size, par.max_in_cpu, par.pin_memory) == (
        3, 1_000_000, 0, False
    )  # fmt: skip
