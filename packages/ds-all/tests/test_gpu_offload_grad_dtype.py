"""Tier 3 (GPU): on one CUDA device, ZeRO hands offloaded gradients to the host in the compute
dtype (side-stream copies of 2 bytes per parameter instead of 4, CPU Adam reading them as they
are) with the same bits as the fp32 hand-over, overlapped step and clipping included. Skipped
without a GPU; run with DS_TEST_GPU=1 -m gpu."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from _models import TinyGPT, batch  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _train(stage: int, dtype: torch.dtype, fp32_grads: bool, host_shards: bool, steps: int = 4):
    import ds_offload
    import ds_zero

    torch.manual_seed(0)
    model = TinyGPT(layers=4).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    options = ds_zero.ZeroOptions(
        stage=stage, param_dtype=dtype, param_persistence_threshold=0,
        host_param_shards=host_shards, gradient_clipping=0.05, reduce_bucket_size=4000,
        loss_scaling=ds_zero.LossScaleOptions(initial_scale_power=8)
        if dtype == torch.float16 else None,
    )  # fmt: skip
    stepper = ds_offload.OffloadStepper(
        {"device": "cpu", "pin_memory": True, "exact_16bit_grads": not fp32_grads}
    )
    zero = ds_zero.wrap(model, opt, options, stepper=stepper)
    stepper._copier.log = []  # bytes of every side-stream copy
    losses, norms = [], []
    for step in range(steps):
        x, y = batch(step, 4)
        loss = zero(x.cuda(), y.cuda())
        zero.backward(loss.float())
        zero.step()
        losses.append(float(loss))
        norms.append(zero.grad_norm)
    zero.synchronize()
    torch.cuda.synchronize()
    d2h = sum(r[1] for r in stepper._copier.log if r[0] == "d2h")
    return zero, losses, norms, d2h


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("stage,host_shards", [(2, False), (3, False), (3, True)])
def test_16bit_gradients_to_the_host_on_cuda_are_bitwise_the_fp32_hand_over(
    stage, host_shards, dtype
):
    ref, ref_losses, ref_norms, ref_d2h = _train(stage, dtype, True, host_shards)
    zero, losses, norms, d2h = _train(stage, dtype, False, host_shards)
    assert set(zero.grad_handover_dtypes) == {dtype}
    assert set(ref.grad_handover_dtypes) == {torch.float32}
    assert d2h * 2 == ref_d2h > 0  # half the device-to-host gradient bytes
    assert losses == ref_losses and norms == ref_norms and ref_norms[0] > 0.05
    want = ref.full_state_dict()
    for k, v in zero.full_state_dict().items():
        assert torch.equal(v, want[k]), k
    zero.close()
    ref.close()
