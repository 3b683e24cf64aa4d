"""``ds_all.utils.safe_get_full_grad`` / ``safe_set_full_grad`` on 2 gloo ranks at every ZeRO
stage: after the boundary backward each parameter's whole gradient equals a single-process
torch gradient of the whole batch (each rank computes half of it); a set gradient is what the
step applies, as is one updated by ``safe_update_full_grad_vectorized``; before the boundary,
stages 0-1 say the gradient is not reduced yet. Stages 0-2
refuse the ZeRO-3 local accessors (``safe_get_local_grad``), naming the full ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ds_comm.testing import run_distributed

LR = 0.1


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))


def _batch(micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(micro)
    return torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)


def _reference_grads() -> list[torch.Tensor]:
    """The gradient of the mean loss over both micro-batches of the window (gas 2)."""
    model = _model()
    for micro in range(2):
        x, y = _batch(micro)
        (nn.functional.mse_loss(model(x), y) / 2).backward()
    return [p.grad.clone() for p in model.parameters()]


def _ranks(stage: int) -> dict:
    import torch.distributed as dist

    import ds_all
    from ds_all.utils import (
        safe_get_full_fp32_param,
        safe_get_full_grad,
        safe_get_local_grad,
        safe_set_full_grad,
        safe_update_full_grad_vectorized,
    )

    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
           "gradient_clipping": 0.0, "zero_optimization": {"stage": stage},
           "optimizer": {"type": "SGD", "params": {"lr": LR}}}  # fmt: skip
    model = _model()
    engine, *_ = ds_all.initialize(model=model, config=cfg, dist_init_required=False)
    rank = dist.get_rank()
    params = list(model.parameters())
    before_boundary = None
    for micro in range(2):
        x, y = _batch(micro)
        half = slice(4 * rank, 4 * rank + 4)  # each rank its half of the reference batch
        engine.backward(nn.functional.mse_loss(engine(x[half]), y[half]))
        if micro == 0:
            try:
                before_boundary = safe_get_full_grad(params[0]).clone()
            except RuntimeError as exc:
                before_boundary = str(exc)
            engine.step()  # DeepSpeed's loop: step() every micro-step, applied at the boundary
    grads = [safe_get_full_grad(p).clone() for p in params]
    try:
        local = safe_get_local_grad(params[0]).numel()
    except AssertionError as exc:  # DeepSpeed's type (ds-zero's NotPartitionedError is one)
        local = str(exc)
    # replace the last bias's gradient: SGD's step must apply exactly it
    last = params[-1]
    w0 = safe_get_full_fp32_param(last).clone()
    safe_set_full_grad(last, torch.full((3,), 2.0))
    reread = safe_get_full_grad(last).clone()
    # then, in one call: the first weight's gradient tripled, the last bias's plus one (3.0)
    first = params[0]
    f0 = safe_get_full_fp32_param(first).clone()
    plain = nn.Parameter(torch.zeros(2))
    plain.grad = torch.ones(2)  # held by no engine: its .grad is updated
    safe_update_full_grad_vectorized(
        [first, last, plain], lambda g, p: g * 3 if p is not last else g + 1
    )
    engine.step()
    moved = safe_get_full_fp32_param(last) - w0
    moved_first = safe_get_full_fp32_param(first) - f0
    outside = safe_get_full_grad(nn.Parameter(torch.zeros(2)))
    return {"grads": grads, "before": before_boundary, "reread": reread, "moved": moved,
            "moved_first": moved_first, "plain_grad": plain.grad, "outside": outside,
            "local": local}  # fmt: skip


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_full_grad_equals_torch_and_set_is_applied(stage):
    ref = _reference_grads()
    for res in run_distributed(_ranks, 2, args=(stage,), timeout=240):
        for got, want in zip(res["grads"], ref, strict=True):
            assert got.shape == want.shape and got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        assert torch.equal(res["reread"], torch.full((3,), 2.0))
        torch.testing.assert_close(res["moved"], torch.full((3,), -LR * 3.0))
        torch.testing.assert_close(res["moved_first"], -LR * 3 * ref[0], rtol=1e-5, atol=1e-7)
        assert torch.equal(res["plain_grad"], torch.full((2,), 3.0))
        assert res["outside"] is None  # as DeepSpeed: no engine, no .grad
        if stage < 3:
            assert isinstance(res["local"], str) and "stage 3 only" in res["local"]
            assert "safe_get_full_grad" in res["local"]
        else:  # the local piece exists (its size is this rank's share)
            assert isinstance(res["local"], int)
        if stage < 2:  # local accumulation: not reduced before the boundary
            assert isinstance(res["before"], str) and "not reduced yet" in res["before"]
        else:  # reduced every micro-step: the first micro-batch's part of the gradient
            assert isinstance(res["before"], torch.Tensor) and res["before"].abs().sum() > 0
