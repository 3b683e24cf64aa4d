"""ZeRO++ keys through the engine: refused below stage 3 naming the key; at stage 3 (with CPU
optimizer offload too) training follows plain ZeRO-3."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from ds_comm.testing import distributed_test

sys.path.insert(0, os.path.dirname(__file__))

from _models import TinyGPT, batch, config  # noqa: E402

ZEROPP = {
    "zero_quantized_weights": True,
    "zero_quantized_gradients": True,
    "zero_hpz_partition_size": 2,
}


def test_zeropp_below_stage_3_is_refused_naming_the_key():
    import ds_all

    cfg = config(2, 4)
    cfg["zero_optimization"]["zero_quantized_gradients"] = True
    with pytest.raises(ds_all.ConfigError, match="zero_quantized_gradients.*stage 3"):
        ds_all.initialize(model=TinyGPT(), config=cfg, dist_init_required=False)


def _losses(extra: dict, steps: int = 6) -> tuple[list[float], object]:
    import ds_all

    torch.manual_seed(0)
    cfg = config(3, 4, bf16={"enabled": True})
    cfg["zero_optimization"].update(extra)
    engine, _, _, _ = ds_all.initialize(model=TinyGPT(), config=cfg, dist_init_required=False)
    losses = []
    for step in range(steps):
        x, y = batch(step, 4)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses, engine


@distributed_test(world_size=2, timeout=180)
def test_zeropp_trains_like_zero3_with_and_without_offload(world_size):
    os.environ["LOCAL_WORLD_SIZE"] = "1"  # two "nodes" of one rank: qgZ's cross-node hop runs
    plain, _ = _losses({})
    for extra in (ZEROPP, {**ZEROPP, "offload_optimizer": {"device": "cpu"}}):
        losses, engine = _losses(extra)
        zpp = engine.zero.zeropp
        assert zpp is not None and zpp.quantized_weights and zpp.hpz_size == 2 and zpp.nodes == 2
        for a, b in zip(losses, plain):
            assert abs(a - b) <= 0.03 * abs(b), (losses, plain)
