"""A PipelineModule through initialize(): train_batch on 2 stages matches a single-process run
of the same sequential model (fp32)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ds_comm.testing import run_distributed

CFG = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 4,
    "steps_per_print": 100,
    "optimizer": {"type": "SGD", "params": {"lr": 0.05}},
    "gradient_clipping": 1.0,
    "pipeline": {"schedule": "1f1b"},
}


def _layers() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)]


def _data(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(step)
    return [(torch.randn(4, 8, generator=g), torch.randn(4, 4, generator=g)) for _ in range(4)]


def _pipeline_losses() -> list[float]:
    import ds_all
    from ds_pipe import PipelineModule

    model = PipelineModule(
        layers=_layers(), num_stages=2, loss_fn=nn.MSELoss(), partition_method="uniform"
    )
    engine, _, _, _ = ds_all.initialize(model=model, config=CFG, dist_init_required=False)
    return [float(engine.train_batch(iter(_data(step)))) for step in range(3)]


def _reference() -> list[float]:
    model = nn.Sequential(*_layers())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    out = []
    for step in range(3):
        total = 0.0
        for x, y in _data(step):
            loss = nn.functional.mse_loss(model(x), y) / 4
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        out.append(total)
    return out


def test_pipeline_engine_matches_sequential():
    ref = _reference()
    for losses in run_distributed(_pipeline_losses, 2, timeout=120):
        assert losses == pytest.approx(ref, rel=1e-5)
