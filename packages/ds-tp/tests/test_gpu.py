"""Tier 3 (CUDA): AutoTP's layers on GPUs. One GPU: at tp=1 the wrapped model's loss and
gradients equal the plain model's exactly (no collectives, the same matmuls). Two GPUs (NCCL):
tp=2 trains like one process (fp32, 1e-5 relative)."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import ds_tp  # noqa: E402
from ds_comm.testing import distributed_test  # noqa: E402


@pytest.mark.gpu
def test_tp1_wrappers_equal_plain_on_cuda():
    from _models import TinyLlama, batch

    torch.manual_seed(0)
    ref = TinyLlama(hidden=64, heads=8, kv=4, inter=128).cuda()
    wrapped = ds_tp.autotp(copy.deepcopy(ref), None, preset_model="llama")
    assert isinstance(wrapped.model.layers[0].self_attn.q_proj, ds_tp.ColumnParallelLinear)
    ids = batch(0).cuda()
    a, b = ref(ids), wrapped(ids)
    a.backward()
    b.backward()
    # Same math, but not bitwise on CUDA: the wrappers hold their weights as resized views, and
    # cuBLAS may choose another kernel for another stride (seen on an H100: equal to 4 digits)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for (n, p), q in zip(ref.named_parameters(), wrapped.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.gpu(n=2)
@distributed_test(world_size=[2], backend="nccl")
def test_tp2_trains_like_one_process_on_two_gpus():
    import torch.distributed as dist
    from _models import TinyLlama, batch

    torch.cuda.set_device(dist.get_rank())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    ref = TinyLlama(hidden=64, heads=8, kv=4, inter=128).cuda()
    tp = ds_tp.autotp(copy.deepcopy(ref), dist.group.WORLD, preset_model="llama")
    for model in (ref, tp):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model.losses = []
        for step in range(3):
            loss = model(batch(step).cuda())
            loss.backward()
            opt.step()
            opt.zero_grad()
            model.losses.append(loss.item())
    assert tp.losses == pytest.approx(ref.losses, rel=1e-5)
    full = ds_tp.gather_full_state_dict(tp)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(full[k], v, rtol=1e-5, atol=1e-6)
