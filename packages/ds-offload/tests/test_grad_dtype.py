"""16-bit host gradient buffers: a partition whose caller can hand its gradient over exactly in
bf16/fp16 (``grad_dtype`` on the partition, as ds_zero sets it) gets a host gradient buffer of
that dtype, and CPU Adam reads it as it is; the update is bitwise the one of the fp32 buffer
holding the widened gradient. An fp32 gradient for such a partition is still taken exactly."""

import pytest
import torch
from _zero_like import FlatDriver, batch, tiny_model

from ds_offload import OffloadStepper

HP = [{"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1}]
NPARTS = 7


def _run(config, grad_buffers, dtype, narrow, steps=4, fp32_at=2, **kw):
    """Train the tiny model with gradients rounded to ``dtype``; ``narrow``: partitions announce
    ``grad_dtype`` and get the 16-bit gradient (else fp32 buffers and the widened gradient).
    At step ``fp32_at`` every gradient is handed over unrounded in fp32 (a caller that
    accumulated after all)."""
    stepper = OffloadStepper(config, grad_buffers=grad_buffers, **kw)
    driver = FlatDriver(tiny_model(), NPARTS, lp_dtype=dtype)
    for part in driver.parts:
        part.grad_dtype = dtype if narrow else torch.float32
    stepper.setup(driver.parts, HP)
    dtypes = [stepper.grad_dtype(p.index) for p in driver.parts]
    memory = stepper.host_memory()
    for s in range(steps):
        x, y = batch(s)
        (torch.nn.functional.mse_loss(driver.model(x), y) * 64.0).backward()
        grads = driver.grads()  # fp32: at ``fp32_at`` not representable in 16 bits
        if s != fp32_at:
            grads = [g.to(dtype) for g in grads]
            if not narrow:
                grads = [g.float() for g in grads]  # exactly the 16-bit values
        for part, g in reversed(list(zip(driver.parts, grads))):
            stepper.grad_ready(part.index, g, early_copy=True)
        stepper.step(grads, grad_scale=torch.tensor(1 / 64.0), wait=False)
        stepper.synchronize()
        # an fp32 gradient for a 16-bit buffer went to an fp32 buffer of its own
        assert bool(stepper._grad_spill) == (narrow and s == fp32_at)
        for p in driver.params:
            p.grad = None
    masters = torch.cat([stepper.state_tensors(p.index)["master"].clone() for p in driver.parts])
    shards = torch.cat([p.param_shard for p in driver.parts])
    stepper.close()
    return masters, shards, dtypes, memory


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("grad_buffers", [0, 3], ids=["own", "pool"])
def test_16bit_gradient_buffers_update_bitwise_as_fp32(dtype, grad_buffers):
    cfg = {"device": "cpu", "pin_memory": False}
    want_m, want_s, want_dt, want_mem = _run(cfg, grad_buffers, dtype, narrow=False)
    got_m, got_s, got_dt, got_mem = _run(cfg, grad_buffers, dtype, narrow=True)
    assert want_dt == [torch.float32] * NPARTS and got_dt == [dtype] * NPARTS
    # half the gradient bytes on the host; the optimizer state is the same 12 bytes
    assert got_mem["gradient_buffers"] * 2 == want_mem["gradient_buffers"] > 0
    assert got_mem["optimizer_state_host"] == want_mem["optimizer_state_host"]
    assert torch.equal(got_m, want_m) and torch.equal(got_s, want_s)


def test_nvme_store_and_delayed_update_take_16bit_gradients(tmp_path):
    for cfg in (
        {"device": "nvme", "nvme_path": str(tmp_path), "buffer_count": 2, "pin_memory": False},
        {"device": "cpu", "pin_memory": False, "delayed_update": True},
    ):
        want = _run(cfg, None, torch.bfloat16, narrow=False)
        got = _run(cfg, None, torch.bfloat16, narrow=True)
        assert got[2] == [torch.bfloat16] * NPARTS, cfg
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), cfg


def test_partitions_kept_on_the_device_take_fp32_gradients():
    """ratio < 1: the partitions stepped on the device read the caller's gradient with their
    fused optimizer, so only the offloaded ones take 16-bit gradients."""
    stepper = OffloadStepper({"device": "cpu", "pin_memory": False, "ratio": 0.5})
    driver = FlatDriver(tiny_model(), NPARTS, lp_dtype=torch.bfloat16)
    for part in driver.parts:
        part.grad_dtype = torch.bfloat16
    stepper.setup(driver.parts, HP)
    assert stepper.on_device and stepper.offloaded
    for i in stepper.on_device:
        assert stepper.grad_dtype(i) == torch.float32
    for i in stepper.offloaded:
        assert stepper.grad_dtype(i) == torch.bfloat16
        assert stepper._grad_host[i].dtype == torch.bfloat16
    # a gradient of another 16-bit dtype is widened into an fp32 buffer, never rounded
    i = stepper.offloaded[0]
    odd = torch.full((driver.parts[i].master.numel(),), 1 + 2**-9, dtype=torch.float16)
    stepper.grad_ready(i, odd, early_copy=True)
    assert stepper._grad_spill[i].dtype == torch.float32
    assert torch.equal(stepper._grad_spill[i], odd.float())
    stepper.skip_step()
    stepper.close()


def test_exact_16bit_grads_false_keeps_fp32_buffers():
    """``exact_16bit_grads: false``: partitions that offer a 16-bit hand-over still get fp32 host
    buffers (the caller then hands over fp32), with the same update bits; a non-bool value is
    refused naming the key."""
    cfg = {"device": "cpu", "pin_memory": False}
    want_m, want_s, _, want_mem = _run(cfg, 0, torch.bfloat16, narrow=False)
    got_m, got_s, got_dt, got_mem = _run(
        {**cfg, "exact_16bit_grads": False}, 0, torch.bfloat16, narrow=False
    )
    assert got_dt == [torch.float32] * NPARTS
    assert got_mem["gradient_buffers"] == want_mem["gradient_buffers"] > 0
    assert torch.equal(got_m, want_m) and torch.equal(got_s, want_s)
    stepper = OffloadStepper({**cfg, "exact_16bit_grads": False})
    driver = FlatDriver(tiny_model(), NPARTS, lp_dtype=torch.bfloat16)
    for part in driver.parts:
        part.grad_dtype = torch.bfloat16
    stepper.setup(driver.parts, HP)
    assert all(stepper.grad_dtype(p.index) == torch.float32 for p in driver.parts)
    assert all(stepper._grad_host[i].dtype == torch.float32 for i in stepper.offloaded)
    stepper.close()
    with pytest.raises(ValueError, match="offload_optimizer.exact_16bit_grads"):
        OffloadStepper({**cfg, "exact_16bit_grads": "sometimes"})
