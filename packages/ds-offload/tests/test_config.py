"""Config sections: DeepSpeed names and defaults, errors that name the key."""

import pytest

from ds_offload import (
    AioConfig,
    AioOptions,
    OffloadDevice,
    OffloadOptimizerConfig,
    OffloadParamConfig,
)


def test_defaults_are_deepspeeds():
    aio = AioConfig()
    assert (aio.block_size, aio.queue_depth, aio.thread_count) == (1_048_576, 8, 1)
    assert (aio.single_submit, aio.overlap_events, aio.use_gds) == (False, True, False)
    opt = OffloadOptimizerConfig()
    assert opt.device is OffloadDevice.none and not opt.enabled
    assert (opt.buffer_count, opt.pin_memory, opt.fast_init, opt.ratio) == (4, False, False, 1.0)
    par = OffloadParamConfig()
    assert (par.buffer_count, par.buffer_size, par.max_in_cpu) == (5, 100_000_000, 1_000_000_000)


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
            {"buffer_size": 0},
            r"offload_param\.buffer_size",
        ),
        (AioConfig, "aio", {"queue_depth": -1}, r"aio\.queue_depth"),
        (AioConfig, "aio", {"use_gds": True}, "GPUDirect"),
    ],
)
def test_errors_name_the_key(cls, where, data, match):
    with pytest.raises(ValueError, match=match):
        cls.from_dict(data, where)
