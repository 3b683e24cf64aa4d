"""The engine API that DeepSpeed's clients (Hugging Face Trainer, Accelerate, Lightning) call:
accumulation driven by step() counts or by set_gradient_accumulation_boundary, backward's
scale_wrt_gas/retain_graph, the dict-like config, 16-bit export, destroy, init_distributed's
world of one, and zero.Init with DeepSpeed's signature."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from _models import TinyGPT, batch, config, plain_setup, reference  # noqa: E402

from ds_comm.testing import distributed_test  # noqa: E402

STEPS, GAS, MICRO = 4, 2, 4


def _run(stage: int, pattern: str) -> tuple[list[float], list[float], int, dict[str, torch.Tensor]]:
    """Train STEPS optimizer steps; ``pattern`` "step_every_micro" calls step() after every
    backward (DeepSpeed's loop); "boundary" calls set_gradient_accumulation_boundary before each
    backward and step() once per window (Accelerate's loop)."""
    import ds_all

    torch.manual_seed(0)
    engine, _, _, _ = ds_all.initialize(
        model=TinyGPT(), config=config(stage, MICRO, GAS), dist_init_required=False
    )
    losses, lrs = [], []
    for step in range(STEPS):
        total = 0.0
        for k in range(GAS):
            x, y = batch(step * GAS + k, MICRO)
            if pattern == "boundary":
                engine.set_gradient_accumulation_boundary(k == GAS - 1)
            loss = engine(x, y)
            scaled = engine.backward(loss)
            total += float(scaled.detach())
            if pattern == "step_every_micro" or k == GAS - 1:
                engine.step()
        losses.append(total)
        lrs.append(engine.get_lr()[0])
    state = {k: v.detach().clone() for k, v in engine.zero.full_state_dict().items()}
    steps = engine.global_steps
    engine.close()
    return losses, lrs, steps, state


def _plain_lrs() -> list[float]:
    _, opt, sched = plain_setup()
    out = []
    for _ in range(STEPS):
        opt.step()
        sched.step()
        out.append(opt.param_groups[0]["lr"])
    return out


@pytest.mark.parametrize("stage", [0, 2, 3])
@pytest.mark.parametrize("pattern", ["step_every_micro", "boundary"])
def test_both_accumulation_patterns_match_pytorch(stage: int, pattern: str) -> None:
    losses, lrs, steps, state = _run(stage, pattern)
    ref_losses, ref_state = reference(STEPS, 1, MICRO, GAS)
    assert steps == STEPS
    assert lrs == pytest.approx(_plain_lrs(), rel=1e-12)
    assert lrs[1] > 0  # the schedule advanced at each boundary (it lagged with step-per-window)
    assert losses == pytest.approx(ref_losses, abs=1e-6)
    for k, v in ref_state.items():
        torch.testing.assert_close(state[k], v, atol=2e-6, rtol=1e-5)


def test_scale_wrt_gas_false_and_retain_graph() -> None:
    import ds_all

    def train(mode: str) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        engine, _, _, _ = ds_all.initialize(
            model=TinyGPT(), config=config(2, MICRO, GAS), dist_init_required=False
        )
        for k in range(2 * GAS):
            x, y = batch(k, MICRO)
            loss = engine(x, y)
            if mode == "scaled":
                out = engine.backward(loss)
                assert torch.equal(out, loss / GAS)
            elif mode == "unscaled":
                out = engine.backward(loss / GAS, scale_wrt_gas=False)
                assert torch.equal(out, loss / GAS)
            else:  # the graph kept, then a second backward through it adds its gradient
                engine.backward(loss / (2 * GAS), retain_graph=True, scale_wrt_gas=False)
                engine.backward(loss / (2 * GAS), scale_wrt_gas=False)
            engine.step()
        state = engine.zero.full_state_dict()
        engine.close()
        return state

    scaled = train("scaled")
    unscaled = train("unscaled")
    for k in scaled:
        assert torch.equal(scaled[k], unscaled[k]), k  # gas 2: x/2 and x*(1/2) are the same float
    twice = train("twice")
    for k in scaled:
        torch.testing.assert_close(twice[k], scaled[k], atol=1e-6, rtol=1e-5)


def test_config_is_a_dict_and_the_engine_reports_its_state() -> None:
    import ds_all

    torch.manual_seed(0)
    cfg = config(2, MICRO, GAS, fp16={"enabled": False})
    engine, opt, _, _ = ds_all.initialize(model=TinyGPT(), config=cfg, dist_init_required=False)
    assert isinstance(engine.config, dict)
    assert engine.config.get("zero_optimization", {})["stage"] == 2
    assert engine.config["train_micro_batch_size_per_gpu"] == MICRO
    assert engine.config.get("tensorboard", "absent") == "absent"  # keys the user did not set
    assert engine.config.steps_per_print == 1000  # attributes: the validated config
    assert isinstance(engine._config, ds_all.DeepSpeedConfig)
    assert opt.overflow is False
    assert engine.get_global_grad_norm() is None
    for k in range(GAS):
        engine.backward(engine(*batch(k, MICRO)))
        engine.step()
    assert engine.get_global_grad_norm() > 0 and opt.overflow is False
    assert engine.was_step_applied() and engine.global_steps == 1 and engine.micro_steps == GAS
    assert engine.zero_gather_16bit_weights_on_model_save() is False
    with pytest.raises(ValueError, match="requires ZeRO stage 3"):
        engine._zero3_consolidated_16bit_state_dict()
    sd = engine.module_state_dict()
    assert all(v.untyped_storage().nbytes() == v.numel() * v.element_size() for v in sd.values())
    engine.destroy()
    engine.destroy()  # idempotent


@distributed_test(world_size=2, timeout=180)
def test_stage3_16bit_export_on_two_ranks(tmp_path):
    import safetensors.torch
    import torch.distributed as dist

    import ds_all

    rank = dist.get_rank()
    torch.manual_seed(0)
    cfg = config(3, MICRO, 1, zero_optimization={
        "stage": 3, "stage3_param_persistence_threshold": 100,
        "stage3_gather_16bit_weights_on_model_save": True,
    })  # fmt: skip
    engine, _, _, _ = ds_all.initialize(model=TinyGPT(), config=cfg, dist_init_required=False)
    for step in range(3):
        x, y = batch(step, 2 * MICRO)
        sl = slice(rank * MICRO, (rank + 1) * MICRO)
        engine.backward(engine(x[sl], y[sl]))
        engine.step()
    sd = engine._zero3_consolidated_16bit_state_dict()
    _, ref = reference(3, 2, MICRO, 1)
    if rank == 0:
        assert set(sd) == set(ref)
        for k, v in ref.items():
            torch.testing.assert_close(sd[k], v, atol=2e-6, rtol=1e-5)
    else:
        assert sd is None
    out = str(tmp_path / "export")
    if rank == 0:
        os.makedirs(out, exist_ok=True)
    dist.barrier()
    assert engine.save_16bit_model(out, "model.safetensors") is True
    if rank == 0:
        saved = safetensors.torch.load_file(os.path.join(out, "model.safetensors"))
        for k, v in ref.items():
            torch.testing.assert_close(saved[k], v, atol=2e-6, rtol=1e-5)
    engine.destroy()


_WORLD_OF_ONE = """
import os, torch, torch.distributed as dist
import ds_all
from ds_all import comm
assert not dist.is_initialized()
ds_all.init_distributed(dist_backend="gloo", distributed_port=29731)
assert dist.get_world_size() == 1 and dist.get_rank() == 0 and comm.get_local_rank() == 0
assert os.environ["RANK"] == "0" and os.environ["MASTER_PORT"] == "29731"
t = torch.ones(2); dist.all_reduce(t); assert t.tolist() == [1.0, 1.0]
print("OK")
"""


def test_plain_python_is_a_world_of_one() -> None:
    env = {k: v for k, v in os.environ.items() if k not in (
        "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
        "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK",
    )}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", _WORLD_OF_ONE], env=env, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout


def test_zero_init_takes_deepspeeds_arguments() -> None:
    from torch import nn

    import ds_all

    with ds_all.zero.Init(config_dict_or_path={"bf16": {"enabled": True}}, remote_device="cpu"):
        layer = nn.Linear(8, 4)
    assert layer.weight.dtype == torch.bfloat16
    with ds_all.zero.GatheredParameters(list(layer.parameters())):
        assert layer.weight.shape == (4, 8) and layer.weight.float().abs().sum() > 0
    with ds_all.zero.Init(dtype=torch.float16, config_dict_or_path={"bf16": {"enabled": True}}):
        half = nn.Linear(8, 4)
    assert half.weight.dtype == torch.float16  # an explicit dtype wins over the config's
    with ds_all.zero.Init(enabled=False):
        plain = nn.Linear(8, 4)
    assert plain.weight.dtype == torch.float32 and plain.weight.numel() == 32
    with pytest.raises(ValueError, match="module="):
        ds_all.zero.Init(module=nn.Linear(2, 2))
    with pytest.raises(ValueError, match="remote_device"):
        ds_all.zero.Init(remote_device="disk")


@pytest.mark.parametrize(
    "how",
    ["call", {"classes": "Experts"}, {"names": ["blocks.2"]}, {"name_suffixes": ["ks.2"]}],
    ids=["set_z3_leaf_modules", "config-classes", "config-names", "config-suffixes"],
)
def test_z3_leaf_modules_are_gathered_whole(how) -> None:
    # flagged by the call, or by zero_optimization.leaf_module (which initialize applies)
    from torch import nn

    import ds_all
    from ds_all.utils import get_z3_leaf_modules, set_z3_leaf_modules

    class Experts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.experts = nn.ModuleList(nn.Linear(32, 32) for _ in range(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.experts[int(x.detach().sum()) % 3](x)  # one expert per batch

    torch.manual_seed(0)
    model = TinyGPT()
    model.blocks.append(Experts())
    cfg = config(3, MICRO, 1)
    if how == "call":
        assert set_z3_leaf_modules(model, [Experts]) == [model.blocks[2]]
    else:
        cfg["zero_optimization"]["leaf_module"] = how
    engine, _, _, _ = ds_all.initialize(model=model, config=cfg, dist_init_required=False)
    assert get_z3_leaf_modules(model) == [model.blocks[2]]
    from ds_all.utils import z3_leaf_parameter

    leaf_params = {id(p) for p in model.blocks[2].parameters()}
    for p in model.parameters():  # ZeRO-3 pointed the leaf's parameters at it
        assert z3_leaf_parameter(p) is (id(p) in leaf_params)
    assert model.blocks[2].experts[0].weight.ds_z3_leaf_module is model.blocks[2]
    inner = {id(m) for m in model.blocks[2].experts}
    assert not inner & {id(u) for u in engine.zero._units}
    engine.backward(engine(*batch(0, MICRO)))
    engine.step()
    engine.close()


def test_leaf_module_config_paths_and_unmatched_names_warn(caplog) -> None:
    from torch import nn

    from ds_all.runtime.zero.leaf_module_config import (
        DEFAULT_LEAF_MODULE_CLASSES,
        DeepSpeedZeroLeafModuleConfig,
    )
    from ds_all.utils import set_z3_leaf_modules_by_name, set_z3_leaf_modules_by_suffix
    from ds_all.utils.z3_leaf_module import apply_zero_leaf_module_config

    assert DEFAULT_LEAF_MODULE_CLASSES[0].endswith("modeling_mixtral.MixtralSparseMoeBlock")
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    assert apply_zero_leaf_module_config(model, DeepSpeedZeroLeafModuleConfig()) == []
    cfg = DeepSpeedZeroLeafModuleConfig(names=["1", "nope"], name_suffixes=["1.0", "zz"])
    with caplog.at_level("WARNING"):
        assert apply_zero_leaf_module_config(model, cfg) == [model[1], model[1][0]]
    assert "['nope']" in caplog.text and "['zz']" in caplog.text
    with pytest.raises(ValueError, match="nope"):
        set_z3_leaf_modules_by_name(model, ["nope"])
    with pytest.raises(ValueError, match="zz"):
        set_z3_leaf_modules_by_suffix(model, ["zz"])
    found, missing = set_z3_leaf_modules_by_name(model, ["1", "x"], False, False)
    assert found == [model[1]] and missing == ["x"] and not model[1]._z3_leaf


def test_buffers_are_checkpointed_and_in_zero_to_fp32(tmp_path) -> None:
    from torch import nn

    import ds_all
    from ds_all.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 1))

    cfg = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
           "zero_optimization": {"stage": 2}}  # fmt: skip
    engine, _, _, _ = ds_all.initialize(model=build(), config=cfg, dist_init_required=False)
    for _ in range(3):
        engine.backward(engine(torch.randn(4, 8)).square().mean())
        engine.step()
    engine.save_checkpoint(str(tmp_path))
    saved = {k: v.clone() for k, v in engine.module.state_dict().items()}
    engine.close()
    fresh, _, _, _ = ds_all.initialize(model=build(), config=cfg, dist_init_required=False)
    assert not torch.equal(fresh.module[1].running_mean, saved["1.running_mean"])
    fresh.load_checkpoint(str(tmp_path))
    for k, v in fresh.module.state_dict().items():
        assert torch.equal(v, saved[k]), k
    fp32 = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path))
    assert set(fp32) == set(saved)  # weights, running statistics and num_batches_tracked
    assert int(fp32["1.num_batches_tracked"]) == 3
    fresh.close()
