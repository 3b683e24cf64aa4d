"""Tier 3 (GPU): the runtime on a CUDA device matches the CPU reference."""

from __future__ import annotations

import pytest
import torch
from pipe_models import BASE_SEED, PlainSGD, data, loss_fn, reference_run, specs

from ds_pipe import PipelineModule, PipelineRuntime

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("schedule, chunks", [("1f1b", 1), ("interleaved_1f1b", 2)])
def test_single_gpu_pipeline_matches_cpu_reference(schedule, chunks):
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device("cuda")
    module = PipelineModule(
        specs("tuple", 4),
        num_stages=1,
        loss_fn=loss_fn,
        seed_layers=True,
        base_seed=BASE_SEED,
        num_chunks=chunks,
        partition_method="uniform",
    ).to(device)
    rt = PipelineRuntime(
        module, PlainSGD(module.parameters(), 0.1), micro_batches=4, schedule=schedule
    )
    assert rt.device.type == "cuda"
    ref_losses, _, ref_params = reference_run(specs("tuple", 4), 2, 4, 2, 1)
    for step in range(2):
        loss = rt.train_batch(iter(data(step, 0, 4, 2)))
        assert loss.item() == pytest.approx(ref_losses[step], rel=1e-5)
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.detach().cpu(), ref_params[name], rtol=1e-5, atol=1e-6)
