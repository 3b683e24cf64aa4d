"""A PipelineModule through initialize(): train_batch on 2 stages matches a single-process run
of the same sequential model (fp32)."""

from __future__ import annotations

import pytest
import torch
from _models import sequential_sgd_losses
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
    return sequential_sgd_losses(nn.Sequential(*_layers()), _data, steps=3, lr=0.05)


def test_pipeline_engine_matches_sequential():
    ref = _reference()
    for losses in run_distributed(_pipeline_losses, 2, timeout=120):
        assert losses == pytest.approx(ref, rel=1e-5)


# clipping at 0.05 is active on every step here: the norm must be over both stages
CFG_ZERO1 = {**CFG, "zero_optimization": {"stage": 1}, "gradient_clipping": 0.05}


def _zero1_losses() -> tuple[int, list[float], int]:
    """pp=2 x dp=2 on 4 ranks with ZeRO-1 inside each stage; each replica reads its own data."""
    import ds_all
    from ds_pipe import PipelineModule

    model = PipelineModule(
        layers=_layers(), num_stages=2, loss_fn=nn.MSELoss(), partition_method="uniform"
    )
    engine, _, _, _ = ds_all.initialize(model=model, config=CFG_ZERO1, dist_init_required=False)
    assert engine.train_batch_size() == 4 * 4 * 2  # the triangle over dp=2, not the world
    dp = engine.runtime.grid.get_data_parallel_id()
    losses = [float(engine.train_batch(iter(_data(10 * step + dp)))) for step in range(3)]
    local = sum(p.numel() for p in model.parameters())
    held = sum(f.numel for f in engine.zero.state_fragments() if f.name.startswith("optimizer."))
    return dp, losses, held < local  # optimizer state partitioned over the stage's replicas


def _zero1_reference() -> list[list[float]]:
    """The same sequential model, both replicas' micro-batches averaged, clipped, stepped."""
    model = nn.Sequential(*_layers())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    out = []
    for step in range(3):
        per_replica = []
        for dp in range(2):
            total = 0.0
            for x, y in _data(10 * step + dp):
                loss = nn.functional.mse_loss(model(x), y) / 4
                (loss / 2).backward()
                total += float(loss.detach())
            per_replica.append(total)
        assert torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05) > 0.05
        opt.step()
        opt.zero_grad()
        out.append(per_replica)
    return out


def test_pipeline_engine_zero1_pp2_dp2_matches_sequential():
    ref = _zero1_reference()
    for dp, losses, partitioned in run_distributed(_zero1_losses, 4, timeout=180):
        assert losses == pytest.approx([r[dp] for r in ref], rel=1e-5)
        assert partitioned


def _tied_bf16() -> None:
    import ds_all
    from ds_pipe import LayerSpec, PipelineModule, TiedLayerSpec

    layers = [TiedLayerSpec("emb", nn.Linear, 8, 8), LayerSpec(nn.Tanh),
              TiedLayerSpec("emb", nn.Linear, 8, 8)]  # fmt: skip
    model = PipelineModule(layers=layers, num_stages=2, loss_fn=nn.MSELoss())
    with pytest.raises(ds_all.ConfigError, match="TiedLayerSpec.*bf16.enabled is True"):
        ds_all.initialize(model=model, config={**CFG, "bf16": {"enabled": True}},
                          dist_init_required=False)  # fmt: skip


def test_tied_pipeline_with_bf16_is_a_clear_error():
    run_distributed(_tied_bf16, 2, timeout=120)
