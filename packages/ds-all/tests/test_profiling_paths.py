"""``ds_all.profiling.flops_profiler`` holds DeepSpeed's names, as ds-profile's very objects."""

from __future__ import annotations

import torch

import ds_profile
from ds_all.profiling import flops_profiler
from ds_all.profiling.flops_profiler import profiler

NAMES = ["FlopsProfiler", "get_model_profile", "number_to_string", "flops_to_string", "macs_to_string",
         "params_to_string", "duration_to_string", "bytes_to_string", "DEFAULT_PRECISION",
         "get_module_flops", "get_module_macs", "get_module_duration"]  # fmt: skip


def test_deepspeed_names_are_ds_profile_objects():
    for name in NAMES:
        assert getattr(flops_profiler, name) is getattr(ds_profile, name)
        assert getattr(profiler, name) is getattr(ds_profile, name)


def test_get_model_profile_through_the_deepspeed_path():
    model = torch.nn.Linear(8, 4)
    flops, macs, params = flops_profiler.get_model_profile(
        model, input_shape=(2, 8), print_profile=False
    )
    assert (flops, macs, params) == ("128 ", "64 MACs", "36")


def test_module_getters_through_the_deepspeed_path():
    model = torch.nn.Sequential(torch.nn.Linear(8, 4, bias=False), torch.nn.ReLU())
    prof = flops_profiler.FlopsProfiler(model)
    prof.start_profile()
    model(torch.randn(2, 8))
    prof.stop_profile()
    assert flops_profiler.get_module_macs(model) == 64 == model[0].__macs__
    assert profiler.get_module_flops(model) == 128 + 8  # + ReLU per element
    assert flops_profiler.get_module_duration(model) == model.__duration__ > 0
    prof.end_profile()
