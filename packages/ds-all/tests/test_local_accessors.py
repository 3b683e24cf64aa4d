"""``ds_all.utils.safe_get_local_*`` / ``safe_set_local_*`` on 2 gloo ranks at ZeRO 3: every
rank's pieces, concatenated in rank order, are the whole fp32 parameter, Adam state and
gradient (equal to the full accessors' and to single-process torch AdamW's); local sets on
each rank are what the next step applies; the accessors communicate nothing (one rank alone
may call them). Stages 0-2 refuse them: see test_full_grad_paths."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ds_comm.testing import run_distributed

LR = 0.01
KEYS = ("master", "exp_avg", "exp_avg_sq", "grad")
# the same edit on every rank's piece and on the reference's whole tensors
EDITS = {"master": (0.5, 0.0), "exp_avg": (1.0, 0.1), "exp_avg_sq": (2.0, 0.0), "grad": (3.0, 0.0)}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)


def _edit(key: str, t: torch.Tensor) -> torch.Tensor:
    scale, shift = EDITS[key]
    return t * scale + shift


def _reference() -> dict:
    """Two AdamW steps, a third backward (its gradient and the state read), the edits, the step."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    for step in range(3):
        x, y = _batch(step)
        nn.functional.mse_loss(model(x), y).backward()
        if step < 2:
            opt.step()
            opt.zero_grad()
    params = list(model.parameters())

    def state(key: str, p: nn.Parameter) -> torch.Tensor:
        return {"master": p.data, "grad": p.grad}.get(key, opt.state[p].get(key))

    read = {key: [state(key, p).clone() for p in params] for key in KEYS}
    with torch.no_grad():
        for p in params:
            for key in KEYS:
                state(key, p).copy_(_edit(key, state(key, p)))
    opt.step()
    with torch.no_grad():
        out = model(_batch(9)[0])
    return {"read": read, "after": [p.detach().clone() for p in params], "out": out}


def _ranks() -> dict:
    import torch.distributed as dist

    import ds_all
    from ds_all.utils import (
        safe_get_full_fp32_param,
        safe_get_full_grad,
        safe_get_full_optimizer_state,
        safe_get_local_fp32_param,
        safe_get_local_grad,
        safe_get_local_optimizer_state,
        safe_set_local_fp32_param,
        safe_set_local_grad,
        safe_set_local_optimizer_state,
    )

    # biases (10, 3 elements) stay whole on every rank (persistent), the weights are partitioned:
    # both kinds of stage-3 bucket, pieces split unevenly and empty on some rank
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
           "gradient_clipping": 0.0,
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 10},
           "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0}}}  # fmt: skip
    model = _model()
    engine, *_ = ds_all.initialize(model=model, config=cfg, dist_init_required=False)
    rank = dist.get_rank()
    half = slice(4 * rank, 4 * rank + 4)  # each rank its half of the reference batch
    for step in range(3):
        x, y = _batch(step)
        engine.backward(nn.functional.mse_loss(engine(x[half]), y[half]))
        if step < 2:
            engine.step()
    params = list(model.parameters())
    get_local = {
        "master": safe_get_local_fp32_param,
        "exp_avg": lambda p: safe_get_local_optimizer_state(p, "exp_avg"),
        "exp_avg_sq": lambda p: safe_get_local_optimizer_state(p, "exp_avg_sq"),
        "grad": safe_get_local_grad,
    }
    get_full = {
        "master": safe_get_full_fp32_param,
        "exp_avg": lambda p: safe_get_full_optimizer_state(p, "exp_avg"),
        "exp_avg_sq": lambda p: safe_get_full_optimizer_state(p, "exp_avg_sq"),
        "grad": safe_get_full_grad,
    }
    set_local = {
        "master": safe_set_local_fp32_param,
        "exp_avg": lambda p, v: safe_set_local_optimizer_state(p, v, "exp_avg"),
        "exp_avg_sq": lambda p, v: safe_set_local_optimizer_state(p, v, "exp_avg_sq"),
        "grad": safe_set_local_grad,
    }
    local = {key: [get_local[key](p).clone() for p in params] for key in KEYS}
    full = {key: [get_full[key](p).clone() for p in params] for key in KEYS}
    if rank == 1:  # no communication: a collective here would pair with rank 0's next one
        for p in params:
            for key in KEYS:
                set_local[key](p, get_local[key](p).clone())
    for p in params:
        for key in KEYS:
            set_local[key](p, _edit(key, get_local[key](p)))
    engine.step()
    after = [safe_get_full_fp32_param(p).clone() for p in params]
    with torch.no_grad():
        out = engine(_batch(9)[0])
    refused = []
    for call in (lambda: safe_get_local_fp32_param(nn.Parameter(torch.zeros(2))),
                 lambda: safe_set_local_grad(params[0], torch.zeros(100))):  # fmt: skip
        try:
            call()
        except (AssertionError, ValueError) as exc:
            refused.append((isinstance(exc, AssertionError), str(exc)))
    return {"local": local, "full": full, "after": after, "out": out.detach().clone(),
            "refused": refused}  # fmt: skip


@pytest.mark.timeout(300)
def test_local_pieces_make_the_whole_and_local_sets_are_applied():
    ref = _reference()
    results = run_distributed(_ranks, 2, timeout=120)
    for key in KEYS:
        for i, want in enumerate(ref["read"][key]):
            pieces = [res["local"][key][i] for res in results]
            assert all(t.dim() == 1 and t.dtype == torch.float32 for t in pieces)
            whole = torch.cat(pieces)
            assert whole.numel() == want.numel(), (key, i, [t.numel() for t in pieces])
            for res in results:
                assert torch.equal(whole, res["full"][key][i].reshape(-1)), (key, i)
            torch.testing.assert_close(whole, want.reshape(-1), rtol=1e-5, atol=1e-6)
    # the layout is exercised: some parameter is split between the ranks, some piece is empty
    sizes = [[res["local"]["master"][i].numel() for res in results] for i in range(4)]
    assert any(all(sizes_i) for sizes_i in sizes) and any(0 in sizes_i for sizes_i in sizes)
    for res in results:
        for got, want in zip(res["after"], ref["after"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["out"], ref["out"], rtol=1e-5, atol=1e-6)
        assert len(res["refused"]) == 2
        (plain_is_assert, plain), (_, wrong_size) = res["refused"]
        assert plain_is_assert and "not held by a ZeRO engine" in plain  # DeepSpeed asserts
        assert "this rank holds" in wrong_size
