"""pp=2 x tp=2 on 4 gloo ranks: a PipelineModule over PipeModelDataParallelTopology whose layers
are ds-tp column/row-parallel blocks trains with the losses and weights of one process (fp32),
with clipping active (norm over both stages and both slices, replicated weights once)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ds_comm.testing import run_distributed

CLIP = 0.05
CFG = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 2,
    "optimizer": {"type": "SGD", "params": {"lr": 0.05}},
    "gradient_clipping": CLIP,
    "zero_optimization": {"stage": 1},
}


def _full_layers() -> list[nn.Module]:
    torch.manual_seed(0)
    blocks = [
        nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh()) for _ in range(3)
    ]
    return [*blocks, nn.Linear(8, 4)]


def _data(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(step)
    return [(torch.randn(4, 8, generator=g), torch.randn(4, 4, generator=g)) for _ in range(2)]


def _pipeline():
    import torch.distributed as dist

    import ds_all
    import ds_tp
    from ds_pipe import PipelineModule, PipeModelDataParallelTopology

    topo = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=1)
    tp_group = None
    for ranks in topo.get_axis_comm_lists("model"):  # every rank creates every group
        g = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            tp_group = g
    layers = []
    for layer in _full_layers():
        if isinstance(layer, nn.Sequential):
            col, act, row, act2 = copy.deepcopy(layer)
            layer = nn.Sequential(ds_tp.ColumnParallelLinear.from_linear(col, tp_group), act,
                                  ds_tp.RowParallelLinear.from_linear(row, tp_group), act2)  # fmt: skip
        layers.append(layer)
    model = PipelineModule(
        layers=layers, topology=topo, loss_fn=nn.MSELoss(), partition_method="uniform"
    )
    engine, _, _, _ = ds_all.initialize(model=model, config=CFG, dist_init_required=False)
    losses = [float(engine.train_batch(iter(_data(step)))) for step in range(3)]
    full = ds_tp.gather_full_state_dict(model)
    return engine.runtime.grid.get_stage_id(), losses, full


def _reference():
    model = nn.Sequential(*_full_layers())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for step in range(3):
        total = 0.0
        for x, y in _data(step):
            loss = nn.functional.mse_loss(model(x), y) / 2
            loss.backward()
            total += float(loss.detach())
        assert torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP) > CLIP
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses, model


def test_pp2_tp2_pipeline_matches_one_process():
    ref_losses, ref = _reference()
    ref_layers = list(ref)
    for stage, losses, full in run_distributed(_pipeline, 4, timeout=240):
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        # this stage's layers (uniform: two per stage), keyed "layers.<pipeline index>...."
        assert len(full) == (8 if stage == 0 else 6)  # two blocks; a block and the head
        for name, value in full.items():
            _, idx, rest = name.split(".", 2)
            want = ref_layers[int(idx)].state_dict()[rest]
            torch.testing.assert_close(
                value,
                want,
                rtol=1e-5,
                atol=1e-6,
                msg=lambda m, n=name, s=stage: f"stage {s} {n}: {m}",
            )
