"""``ds_all.pipe`` / ``ds_all.runtime.pipe``: DeepSpeed's pipeline paths, as ds-pipe's very
objects, and a pipeline written against them trains like the sequential model."""

from __future__ import annotations

import pytest
import torch
from _models import sequential_sgd_losses
from torch import nn

import ds_all
import ds_pipe
from ds_all import pipe
from ds_all.runtime import pipe as runtime_pipe
from ds_all.runtime.pipe import module, topology
from ds_comm.testing import run_distributed

CFG = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 2,
    "steps_per_print": 100,
    "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
    "gradient_clipping": 1.0,
}


def test_paths_are_ds_pipe_objects():
    for name in ("PipelineModule", "LayerSpec", "TiedLayerSpec"):
        assert getattr(pipe, name) is getattr(ds_pipe, name)
        assert getattr(runtime_pipe, name) is getattr(ds_pipe, name)
        assert getattr(module, name) is getattr(ds_pipe, name)
    for name in ("ProcessTopology", "PipeDataParallelTopology", "PipeModelDataParallelTopology"):
        assert getattr(topology, name) is getattr(ds_pipe, name)
    assert runtime_pipe.ProcessTopology is ds_pipe.ProcessTopology
    assert ds_all.PipelineModule is ds_pipe.PipelineModule


def _layers() -> list:
    # built modules for the weighted layers (each stage would otherwise draw its own weights
    # from its own RNG state) and a LayerSpec for the parameterless one
    torch.manual_seed(0)
    return [nn.Linear(6, 12), pipe.LayerSpec(nn.Tanh), nn.Linear(12, 3)]


def _data(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(step)
    return [(torch.randn(2, 6, generator=g), torch.randn(2, 3, generator=g)) for _ in range(2)]


def _deepspeed_style_losses() -> list[float]:
    # as a DeepSpeed script writes it: deepspeed.pipe and deepspeed.runtime.pipe.topology
    topo = topology.PipeDataParallelTopology(num_pp=2, num_dp=1)
    model = pipe.PipelineModule(layers=_layers(), topology=topo, loss_fn=nn.MSELoss(),
                                partition_method="uniform")  # fmt: skip
    engine, _, _, _ = ds_all.initialize(model=model, config=CFG, dist_init_required=False)
    return [float(engine.train_batch(iter(_data(step)))) for step in range(2)]


def _sequential_losses() -> list[float]:
    layers = [x.build() if isinstance(x, pipe.LayerSpec) else x for x in _layers()]
    return sequential_sgd_losses(nn.Sequential(*layers), _data, steps=2, lr=0.1)


@pytest.mark.timeout(180)
def test_a_pipeline_written_for_deepspeed_trains_like_the_sequential_model():
    ref = _sequential_losses()
    for losses in run_distributed(_deepspeed_style_losses, 2, timeout=150):
        assert losses == pytest.approx(ref, rel=1e-5)
