"""Tier 3 (GPU): ZeRO-3 with bf16 weights, optimizer offload (ds-offload) and parameter shards in
pinned host memory (offload_param cpu) on one CUDA device, against the same model stepped by
torch AdamW on the device. Skipped without a GPU; run with DS_TEST_GPU=1 -m gpu."""

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


def _train(offload: bool, steps: int = 4):
    import ds_offload
    import ds_zero

    torch.manual_seed(0)
    model = TinyGPT().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    options = ds_zero.ZeroOptions(stage=3, param_dtype=torch.bfloat16,
                                  param_persistence_threshold=0, host_param_shards=offload)  # fmt: skip
    stepper = ds_offload.OffloadStepper({"device": "cpu", "pin_memory": True}) if offload else None
    zero = ds_zero.wrap(model, opt, options, stepper=stepper)
    return zero, _steps(zero, steps)


def _steps(zero, steps: int) -> list[float]:
    losses = []
    for step in range(steps):
        x, y = batch(step, 4)
        loss = zero(x.cuda(), y.cuda())
        zero.backward(loss.float())
        zero.step()
        losses.append(float(loss))
    torch.cuda.synchronize()
    return losses


def test_offloaded_zero3_trains_like_the_device_optimizer():
    ref, ref_losses = _train(offload=False)
    zero, losses = _train(offload=True)
    assert losses == pytest.approx(ref_losses, rel=1e-3)
    got, want = zero.full_state_dict(), ref.full_state_dict()
    for k in want:  # CPU Adam vs torch AdamW on the same fp32 masters
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)
    # the fp32 masters live on the host only; ZeRO's device copies were freed
    assert all(b.master.untyped_storage().size() == 0 for b in zero.trainable)
    assert all(b.local_shard.is_pinned() for b in zero.buckets if b.shard_params)


def _train_nvme(nvme_dir: str | None, steps: int = 4):
    """ZeRO-3 bf16 on CUDA, optimizer on the CPU (pinned), parameter shards in pinned host
    memory (nvme_dir None) or on NVMe through NvmeParamStore."""
    import ds_offload
    import ds_zero

    torch.manual_seed(0)
    model = TinyGPT(layers=4).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    options = ds_zero.ZeroOptions(stage=3, param_dtype=torch.bfloat16,
                                  param_persistence_threshold=0, host_param_shards=True)  # fmt: skip
    store = None
    if nvme_dir is not None:
        store = ds_offload.NvmeParamStore({"device": "nvme", "nvme_path": nvme_dir,
                                           "pin_memory": True, "max_in_cpu": 0, "buffer_count": 2})  # fmt: skip
    stepper = ds_offload.OffloadStepper({"device": "cpu", "pin_memory": True})
    zero = ds_zero.wrap(model, opt, options, stepper=stepper, param_store=store)
    return zero, _steps(zero, steps)


def test_nvme_parameter_shards_on_cuda_train_like_host_shards(tmp_path):
    """Asynchronous pinned copies out of the store's buffers (released with a CUDA event) and
    read-ahead on a real device: bitwise the losses and weights of host shards."""
    ref, ref_losses = _train_nvme(None)
    zero, losses = _train_nvme(str(tmp_path))
    assert losses == ref_losses
    want = ref.full_state_dict()
    for k, v in zero.full_state_dict().items():
        assert torch.equal(v, want[k]), k
    stats = zero.param_store.stats
    assert stats.on_nvme > 0 and stats.prefetched > 0
    assert all(s.buffer.is_pinned() for s in zero.param_store.slots)
    zero.close()


def _train_mode(stage: int, offload: dict, host_shards: bool = False, bf16: bool = True,
                steps: int = 5):  # fmt: skip
    """ZeRO ``stage`` on CUDA with an offload stepper configured by ``offload`` (cpu, pinned)."""
    import ds_offload
    import ds_zero

    torch.manual_seed(0)
    model = TinyGPT(layers=4).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    options = ds_zero.ZeroOptions(
        stage=stage, param_dtype=torch.bfloat16 if bf16 else torch.float32,
        param_persistence_threshold=0, host_param_shards=host_shards, gradient_clipping=1.0,
        reduce_bucket_size=4000,
    )  # fmt: skip
    stepper = ds_offload.OffloadStepper({"device": "cpu", "pin_memory": True, **offload})
    zero = ds_zero.wrap(model, opt, options, stepper=stepper)
    return zero, _steps(zero, steps)


@pytest.mark.parametrize("stage,host_shards", [(2, False), (3, False), (3, True)])
def test_overlapped_offload_on_cuda_is_bitwise_the_sequential_step(stage, host_shards):
    """Side-stream copies with events, CPU Adam on the worker thread, the next forward waiting
    per partition: the same bits as the step that finishes before returning."""
    ref, ref_losses = _train_mode(stage, {"overlap": False}, host_shards)
    zero, losses = _train_mode(stage, {}, host_shards)
    assert zero._overlap is not None and zero.stepper._worker is not None
    assert losses == ref_losses
    want = ref.full_state_dict()
    for k, v in zero.full_state_dict().items():
        assert torch.equal(v, want[k]), k
    zero.close()
    ref.close()


@pytest.mark.parametrize("stage", [2, 3])
def test_twin_flow_on_cuda_matches_all_on_cpu(stage):
    """ratio 0.5: the first half of the model stepped by ds_kernels' FusedAdam on the GPU while
    CPU Adam steps the rest; fp32 so the two are comparable to rounding."""
    ref, ref_losses = _train_mode(stage, {"ratio": 1.0}, bf16=False)
    zero, losses = _train_mode(stage, {"ratio": 0.5}, bf16=False)
    stepper = zero.stepper
    assert stepper.on_device and stepper.offloaded
    assert type(stepper._device_flow.optimizer).__name__ == "FusedAdam"
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    want = ref.full_state_dict()
    for k, v in zero.full_state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-6, msg=k)
    zero.close()
    ref.close()


def test_delayed_update_and_auto_ratio_on_cuda():
    exact, exact_losses = _train_mode(2, {})
    delayed, losses = _train_mode(2, {"delayed_update": True})
    assert losses[0] == exact_losses[0] and losses[1] != exact_losses[1]
    assert all(torch.isfinite(torch.tensor(losses)))
    auto, _ = _train_mode(3, {"ratio": "auto"})
    # a tiny model fits in half of the free memory: "auto" keeps everything on the device
    assert auto.stepper.ratio == 0.0 and not auto.stepper.offloaded
    for z in (exact, delayed, auto):
        z.close()


def test_offloaded_gradients_leave_the_device_as_backward_makes_them(monkeypatch):
    """One host gradient buffer per partition (a host with room): when backward ends, the device
    holds no reduced fp32 gradient (they were copied on a side stream and dropped); with the
    4-buffer pool (a host without room) the partitions that found no buffer still do. Both give
    the same bits, clipping on."""
    import ds_offload
    import ds_offload._stepper as stepper_mod
    import ds_zero

    def run(host_room: bool):
        monkeypatch.setattr(
            stepper_mod, "host_available_bytes", lambda: (1 << 50) if host_room else 0
        )
        torch.manual_seed(0)
        model = TinyGPT(layers=8).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
        options = ds_zero.ZeroOptions(stage=3, param_dtype=torch.bfloat16, param_persistence_threshold=0,
                                      host_param_shards=True, gradient_clipping=0.05)  # fmt: skip
        stepper = ds_offload.OffloadStepper({"device": "cpu", "pin_memory": True})
        zero = ds_zero.wrap(model, opt, options, stepper=stepper)
        held = []
        for step in range(3):
            x, y = batch(step, 4)
            zero.backward(zero(x.cuda(), y.cuda()).float())
            torch.cuda.synchronize()
            held.append(
                sum(b.grad_shard.numel() * 4 for b in zero.trainable if b.grad_shard is not None)
            )
            zero.step()
        torch.cuda.synchronize()
        return held, zero.full_state_dict(), stepper.grad_buffers

    held, state, buffers = run(host_room=True)
    pool_held, pool_state, pool_buffers = run(host_room=False)
    assert (buffers, pool_buffers) == (0, 4)
    assert held == [0, 0, 0] and min(pool_held) > 0
    for k, v in pool_state.items():
        assert torch.equal(state[k], v), k
