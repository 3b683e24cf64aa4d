"""zero_optimization.offload_optimizer through the engine: the same losses and parameters as
training without offload (fp32, CPU and NVMe to a temporary directory), schedule included."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from _models import TinyGPT, batch, config  # noqa: E402


def _run(zero_extra: dict) -> tuple[list[float], dict[str, torch.Tensor]]:
    import ds_all

    torch.manual_seed(0)
    cfg = config(2, 4)
    cfg["zero_optimization"].update(zero_extra)
    engine, _, _, _ = ds_all.initialize(model=TinyGPT(), config=cfg, dist_init_required=False)
    losses = []
    for step in range(4):
        x, y = batch(step, 4)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses, engine.zero.full_state_dict()


@pytest.mark.parametrize("device", ["cpu", "nvme"])
def test_offload_matches_on_device_optimizer(device, tmp_path):
    ref_losses, ref_state = _run({})
    extra = {"offload_optimizer": {"device": device, "pin_memory": False}}
    if device == "nvme":
        extra["offload_optimizer"]["nvme_path"] = str(tmp_path)
    losses, state = _run(extra)
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    for k, v in ref_state.items():
        torch.testing.assert_close(
            state[k], v, rtol=1e-6, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}"
        )


def test_offload_with_non_adam_optimizer_is_a_config_error():
    import ds_all

    cfg = config(2, 4)
    cfg["optimizer"] = {"type": "SGD", "params": {"lr": 0.1}}
    cfg["scheduler"] = None
    cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    with pytest.raises(ds_all.ConfigError, match="offload_optimizer steps Adam/AdamW"):
        ds_all.initialize(model=TinyGPT(), config=cfg, dist_init_required=False)
