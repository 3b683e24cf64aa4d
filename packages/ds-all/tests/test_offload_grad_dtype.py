"""ZeRO-Offload with 16-bit compute weights on one rank: ZeRO hands each partition's gradient to
ds-offload in the compute dtype (it is exact: no reduction, no accumulation), whose host
gradient buffers hold 2 bytes per parameter instead of 4; the training is bitwise the one of
the fp32 hand-over (clipping and fp16 loss scaling included). Two ranks stay on fp32."""

from __future__ import annotations

import logging
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from _models import TinyGPT, batch, config  # noqa: E402

from ds_comm.testing import run_distributed  # noqa: E402


def _train(stage: int, dtype: str, clip: float, fp32: bool, monkeypatch=None, steps: int = 3):
    """(losses, norms, state, engine) of TinyGPT; ``fp32``: ZeRO's fp32 hand-over forced."""
    import ds_all

    torch.manual_seed(0)
    cfg = config(stage, 4, gradient_clipping=clip)
    cfg[dtype] = {"enabled": True, **({"initial_scale_power": 8} if dtype == "fp16" else {})}
    # fp32: fp32 host buffers for every partition, the hand-over of ds-zero 0.1.4
    cfg["zero_optimization"]["offload_optimizer"] = {
        "device": "cpu", "pin_memory": False, "exact_16bit_grads": not fp32,
    }  # fmt: skip
    engine, _, _, _ = ds_all.initialize(model=TinyGPT(), config=cfg, dist_init_required=False)
    losses, norms = [], []
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    for step in range(steps):
        x, y = batch(step, 8)
        loss = engine(x[4 * rank : 4 * rank + 4], y[4 * rank : 4 * rank + 4])
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        norms.append(engine.zero.grad_norm)
    return losses, norms, engine.zero.full_state_dict(), engine


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("stage", [2, 3])
def test_16bit_gradients_to_the_host_train_bitwise_as_fp32(stage, dtype):
    want_dtype = torch.bfloat16 if dtype == "bf16" else torch.float16
    for clip in (0.5, 0.0):
        *want, ref = _train(stage, dtype, clip, fp32=True)
        *got, engine = _train(stage, dtype, clip, fp32=False)
        stepper = engine.zero.stepper
        n = sum(b.layout.shard_numel for b in engine.zero.trainable)
        assert set(engine.zero.grad_handover_dtypes) == {want_dtype}
        assert {t.dtype for t in stepper._grad_host.values()} == {want_dtype}
        # host bytes per parameter: 12 (fp32 master + 2 moments) + 2 (gradient), was 12 + 4
        assert stepper.host_memory()["gradient_buffers"] == 2 * n
        assert ref.zero.stepper.host_memory()["gradient_buffers"] == 4 * n
        assert got[0] == want[0] and got[1] == want[1], (clip, got[:2], want[:2])
        if clip:
            assert want[1][0] > clip  # clipping was active
        for k, v in want[2].items():
            assert torch.equal(got[2][k], v), (clip, k)
        engine.close()
        ref.close()


def test_the_offload_log_line_names_the_gradient_dtype():
    class Keep(logging.Handler):  # on ds_all's own logger: it does not propagate to the root
        def __init__(self) -> None:
            super().__init__(logging.INFO)
            self.lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(record.getMessage())

    keep = Keep()
    logger = logging.getLogger("ds_all")
    logger.addHandler(keep)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        *_, engine = _train(2, "bf16", 0.5, fp32=False, steps=1)
        *_, ref = _train(2, "bf16", 0.5, fp32=True, steps=1)
    finally:
        logger.removeHandler(keep)
        logger.setLevel(level)
    lines = [line for line in keep.lines if "offload (rank 0)" in line]
    k = len(engine.zero.partitions)
    assert f"(bfloat16 gradients: {k} of {k} partitions)" in lines[0]
    assert "gradients:" not in lines[1]
    engine.close()
    ref.close()


def _two_ranks() -> None:
    want = _train(2, "bf16", 0.5, fp32=True)
    got = _train(2, "bf16", 0.5, fp32=False)
    engine = got[3]
    assert set(engine.zero.grad_handover_dtypes) == {torch.float32}
    assert {t.dtype for t in engine.zero.stepper._grad_host.values()} == {torch.float32}
    assert got[0] == want[0] and got[1] == want[1]
    for k, v in want[2].items():
        assert torch.equal(got[2][k], v), k


def test_two_ranks_stay_on_fp32_gradients():
    """The reduction sums and divides in fp32: nothing to hand over in 16 bits exactly."""
    run_distributed(_two_ranks, 2, timeout=120)
