"""``ds_all.utils.safe_get_full_fp32_param`` and friends: on 2 gloo ranks, at every ZeRO stage,
the whole fp32 parameter and Adam state equal a single-process torch AdamW's, and setting them
changes what the model computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ds_comm.testing import run_distributed

LR = 0.01


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)


def _reference() -> dict[str, list[torch.Tensor]]:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    for step in range(2):
        x, y = _batch(step)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    params = list(model.parameters())
    return {
        "master": [p.detach().clone() for p in params],
        "exp_avg": [opt.state[p]["exp_avg"].clone() for p in params],
        "exp_avg_sq": [opt.state[p]["exp_avg_sq"].clone() for p in params],
    }


def _ranks(stage: int) -> dict:
    import torch.distributed as dist

    import ds_all
    from ds_all.utils import (
        safe_get_full_fp32_param,
        safe_get_full_optimizer_state,
        safe_set_full_fp32_param,
        safe_set_full_optimizer_state,
    )

    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
           "gradient_clipping": 0.0, "zero_optimization": {"stage": stage},
           "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0}}}  # fmt: skip
    model = _model()
    engine, *_ = ds_all.initialize(model=model, config=cfg, dist_init_required=False)
    rank = dist.get_rank()
    for step in range(2):
        x, y = _batch(step)
        half = slice(4 * rank, 4 * rank + 4)  # each rank its half of the reference batch
        loss = nn.functional.mse_loss(engine(x[half]), y[half])
        engine.backward(loss)
        engine.step()
    params = list(model.parameters())
    got = {
        "master": [safe_get_full_fp32_param(p) for p in params],
        "exp_avg": [safe_get_full_optimizer_state(p, "exp_avg") for p in params],
        "exp_avg_sq": [safe_get_full_optimizer_state(p, "exp_avg_sq") for p in params],
    }
    # set: the last layer's bias to a known value, its Adam momentum too; the model follows
    last = params[-1]
    safe_set_full_fp32_param(last, torch.full((3,), 0.5))
    safe_set_full_optimizer_state(last, torch.full((3,), 0.25), "exp_avg")
    with torch.no_grad():
        out = engine(torch.zeros(2, 6))  # zero input: W2 tanh(b1) + the new bias
    after = {
        "bias": safe_get_full_fp32_param(last),
        "exp_avg": safe_get_full_optimizer_state(last, "exp_avg"),
        "out": out.detach().clone(),
    }
    refused = []
    for key in ("momentum_buffer", "step"):  # not AdamW's; a scalar, not per element
        try:
            safe_get_full_optimizer_state(last, key)
        except KeyError as exc:
            refused.append(str(exc))
    try:
        safe_set_full_optimizer_state(last, torch.zeros(3), "step")
    except KeyError as exc:
        refused.append(str(exc))
    outside = safe_get_full_fp32_param(nn.Parameter(torch.zeros(2)))
    return {"got": got, "after": after, "refused": refused, "outside": outside}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_full_state_equals_torch_adamw_and_set_changes_the_model(stage):
    ref = _reference()
    for res in run_distributed(_ranks, 2, args=(stage,), timeout=240):
        for key in ("master", "exp_avg", "exp_avg_sq"):
            for got, want in zip(res["got"][key], ref[key], strict=True):
                assert got.shape == want.shape
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert torch.equal(res["after"]["bias"], torch.full((3,), 0.5))
        assert torch.equal(res["after"]["exp_avg"], torch.full((3,), 0.25))
        # the forward saw the new bias: out = W2 tanh(b1) + 0.5, W2 and b1 as trained
        w2, b1 = ref["master"][2], ref["master"][1]
        want = w2 @ torch.tanh(b1) + 0.5
        torch.testing.assert_close(res["after"]["out"][0], want, rtol=1e-5, atol=1e-6)
        assert len(res["refused"]) == 3
        assert "momentum_buffer" in res["refused"][0] and "exp_avg" in res["refused"][0]
        assert all("'step'" in r for r in res["refused"][1:])
        assert res["outside"] is None  # as DeepSpeed: a parameter no engine holds
