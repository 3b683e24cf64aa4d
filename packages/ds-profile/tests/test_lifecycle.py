"""Nothing is left on the model or in torch when the profiler is not running; the report."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _profile_models import MLP, B, L, mlp_input, mlp_macs
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from ds_profile import FlopsProfiler, ProfilerState, get_model_profile


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_no_hooks_or_modes_outside_a_profile():
    model = MLP()
    originals = (F.linear, F.softmax, torch.matmul, torch.Tensor.__matmul__)
    prof = FlopsProfiler(model)
    assert _hooks(model) == 0 and not _get_current_dispatch_mode_stack()
    prof.start_profile()
    assert _hooks(model) == 2 * len(list(model.modules()))
    assert len(_get_current_dispatch_mode_stack()) == 1
    model(mlp_input())
    prof.stop_profile()
    # stopped: nothing installed, numbers kept
    assert prof.state is ProfilerState.STOPPED
    assert _hooks(model) == 0 and not _get_current_dispatch_mode_stack()
    assert prof.get_total_macs() == mlp_macs()
    model(mlp_input())  # runs unprofiled
    assert prof.get_total_macs() == mlp_macs()
    prof.end_profile()
    assert prof.state is ProfilerState.IDLE
    assert _hooks(model) == 0 and not _get_current_dispatch_mode_stack()
    # no attribute left on the modules, no function replaced anywhere
    assert not any(k.startswith("__") for m in model.modules() for k in vars(m))
    assert (F.linear, F.softmax, torch.matmul, torch.Tensor.__matmul__) == originals


def test_hooks_removed_when_forward_raises():
    model = MLP()
    prof = FlopsProfiler(model)
    prof.start_profile()
    with pytest.raises(RuntimeError):
        model(torch.randn(B, L, 7))  # wrong width: fc1 raises
    prof.end_profile()
    assert _hooks(model) == 0 and not _get_current_dispatch_mode_stack()


def test_get_model_profile_leaves_nothing(tmp_path):
    model = MLP()
    out = tmp_path / "sub" / "profile.txt"
    get_model_profile(
        model, args=[mlp_input()], output_file=str(out), top_modules=2, module_depth=2
    )
    assert _hooks(model) == 0 and not _get_current_dispatch_mode_stack()
    text = out.read_text()
    assert "DeepSpeed Flops Profiler" in text
    assert "fwd MACs per GPU:" in text and "8.7 KMACs" in text
    assert "depth 0:" in text and "depth 1:" in text
    assert "(fc1): Linear(416 = 65% Params, 6.14 KMACs = 70.59% MACs" in text
    assert "in_features=12, out_features=32, bias=True)" in text


def test_not_detailed_and_depth(capsys):
    get_model_profile(MLP(), args=[mlp_input()], detailed=False, module_depth=1)
    text = capsys.readouterr().out
    assert "Detailed Profile" not in text
    assert "depth 0:" in text and "depth 1:" not in text


def test_engine_summary_lines(capsys):
    class Engine:
        world_size = 4
        dp_world_size = 2
        mp_world_size = 2

        def train_micro_batch_size_per_gpu(self) -> int:
            return 3

        def profile_latencies(self) -> dict[str, float]:
            return {"fwd": 0.5, "bwd": 1.0, "step": 0.5}

    model = MLP()
    prof = FlopsProfiler(model, ds_engine=Engine(), recompute_fwd_factor=1.0)
    prof.start_profile()
    model(mlp_input())
    prof.print_model_profile(profile_step=7, detailed=False)
    prof.end_profile()
    text = capsys.readouterr().out
    assert "Profile Summary at step 7:" in text
    assert "params of model = params per GPU * mp_size:" in text and "1.28 K" in text
    assert "bwd FLOPS per GPU = 3 * fwd flops per GPU / bwd latency:" in text
    assert "samples/second:" in text and "6.0" in text  # 3 x 4 samples / 2 s


def test_deepspeed_module_attributes_and_getters():
    """DeepSpeed's per-module attributes: own FLOPs/MACs (children excluded), parameters with
    children, accumulated latency; readable while running and after stop_profile, zeroed by
    reset_profile, deleted by end_profile. get_module_* sum them as DeepSpeed does."""
    from ds_profile import get_module_duration, get_module_flops, get_module_macs

    model = MLP()
    prof = FlopsProfiler(model)
    prof.start_profile()
    assert model.__flops__ == 0 and model.fc1.__macs__ == 0 and model.__duration__ == 0
    model(mlp_input())
    fc1 = B * L * 12 * 32
    assert model.fc1.__macs__ == fc1 and model.fc1.__flops__ == 2 * fc1
    assert model.norm.__flops__ == 5 * B * L * 32 and model.norm.__macs__ == 0
    assert model.__macs__ == 0 and model.__flops__ == 0  # the MLP runs no op of its own
    assert get_module_macs(model) == mlp_macs() == prof.get_total_macs()
    assert get_module_flops(model) == prof.get_total_flops()
    assert get_module_flops(model.fc1) == 2 * fc1
    assert model.__params__ == sum(p.numel() for p in model.parameters())
    assert model.fc1.__params__ == 12 * 32 + 32 and model.act.__params__ == 0
    assert model.__expert_params__ == 0 and model.__model_expert_params__ == 0
    assert 0 < model.fc1.__duration__ <= model.__duration__
    assert get_module_duration(model) == model.__duration__ == prof.get_total_duration()
    first = model.__duration__
    model(mlp_input())  # a second forward accumulates
    assert model.fc1.__macs__ == 2 * fc1 and model.__duration__ > first
    prof.stop_profile()
    model(mlp_input())  # unprofiled: attributes kept, unchanged
    assert model.fc1.__macs__ == 2 * fc1 and get_module_macs(model) == 2 * mlp_macs()
    prof.reset_profile()
    assert all(m.__flops__ == 0 and m.__macs__ == 0 and m.__duration__ == 0
               for m in model.modules())  # fmt: skip
    assert model.__params__ == sum(p.numel() for p in model.parameters())
    prof.end_profile()
    assert not any(hasattr(m, "__flops__") or hasattr(m, "__params__") for m in model.modules())
    with pytest.raises(AttributeError):
        get_module_flops(model)


def test_module_duration_of_a_container_sums_children():
    from ds_profile import get_module_duration

    layers = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])
    model = torch.nn.Sequential()
    model.layers = layers
    prof = FlopsProfiler(model)
    prof.start_profile()
    x = torch.randn(2, 4)
    for layer in layers:  # the ModuleList itself never runs
        x = layer(x)
    assert layers.__duration__ == 0
    assert get_module_duration(layers) == layers[0].__duration__ + layers[1].__duration__ > 0
    prof.end_profile()


def test_expert_params_and_expert_tensor_parallelism():
    class MoE(torch.nn.Module):
        def __init__(self, etp: bool) -> None:
            super().__init__()
            self.enable_expert_tensor_parallelism = etp
            self.gate = torch.nn.Linear(4, 2, bias=False)
            self.expert = torch.nn.Linear(4, 4, bias=False)
            self.expert.weight.group_name = "ep_size_2"  # DeepSpeed's expert mark

    for etp in (False, True):
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), MoE(etp))
        prof = FlopsProfiler(model)
        assert prof.is_expert_tensor_parallelism_enabled() is etp
        prof.start_profile()
        assert model.__params__ == 20 + 8 and model.__expert_params__ == 16
        assert model.__model_expert_params__ == 32  # x expert-parallel size
        assert prof.get_total_params() == 44
        prof.end_profile()
    assert FlopsProfiler(MLP()).is_expert_tensor_parallelism_enabled() is False
