"""The overlapped step (CPU Adam on the worker thread while the caller's next forward starts),
the one-step-delayed update and twin-flow's split, through the stepper's own API.

The overlapped step is held back by a gate until the caller has started waiting for a partition,
so every step really overlaps (the caller reads parameters while the update is in flight) and
the result must still be bitwise the inline step's."""

import threading

import pytest
import torch
from _zero_like import FlatDriver, Part, batch, tiny_model
from torch import nn

from ds_offload import OffloadStepper
from ds_offload._twin import resolve_ratio, split

LR = 1e-2
GROUP = {"lr": LR, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1}


class Gate:
    """Holds each step's CPU Adam until the caller waits for a partition: the caller always
    reaches its reads while the update is in flight."""

    def __init__(self, stepper: OffloadStepper) -> None:
        self.caller_waits = threading.Event()
        inner_adam, inner_wait = stepper._cpu_adam, stepper.wait_partition

        def adam(*args, **kwargs):
            assert self.caller_waits.wait(timeout=60), "the caller never waited"
            return inner_adam(*args, **kwargs)

        def wait_partition(index):
            self.caller_waits.set()
            return inner_wait(index)

        stepper._cpu_adam = adam
        stepper.wait_partition = wait_partition


def _train(stepper, driver, steps, overlapped, on_step=None, final=False):
    """``overlapped``: step(wait=False), then wait per partition before the next forward.
    ``final``: gradients handed over as final (no factor): updates start in grad_ready."""
    gate = Gate(stepper) if overlapped else None
    for s in range(steps):
        if overlapped and s > 0:
            held = stepper._order[0] if not final else driver.parts[0].index
            assert not stepper.partition_ready(held)  # the update is held back
            for part in driver.parts:
                stepper.wait_partition(part.index)
            gate.caller_waits.clear()
        x, y = batch(s)
        nn.functional.mse_loss(driver.model(x), y).backward()
        grads = driver.grads()
        for part, g in zip(driver.parts, grads):
            stepper.grad_ready(part.index, g, early_copy=True, final=final)
        stepper.step(grads, grad_scale=1.0 if final else 0.5, wait=not overlapped)
        if on_step is not None:
            on_step(s)
        driver.sync()
    if gate is not None:
        gate.caller_waits.set()  # let the last update run
    stepper.synchronize()
    return driver


def _run(overlapped, lp_dtype=None, grad_buffers=2, steps=4, on_step=None, final=False):
    stepper = OffloadStepper({"device": "cpu", "overlap": overlapped}, grad_buffers=grad_buffers)
    driver = FlatDriver(tiny_model(), 5, lp_dtype=lp_dtype)
    stepper.setup(driver.parts, [dict(GROUP)])
    _train(stepper, driver, steps, overlapped, on_step, final)
    masters = [stepper.state_tensors(p.index)["master"].clone() for p in driver.parts]
    shards = [p.param_shard.clone() for p in driver.parts if p.param_shard is not None]
    stepper.close()
    return driver.flat.clone(), masters, shards


@pytest.mark.parametrize("lp_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("grad_buffers", [0, 2])
def test_overlapped_step_is_bitwise_the_inline_step(lp_dtype, grad_buffers):
    want = _run(False, lp_dtype, grad_buffers)
    got = _run(True, lp_dtype, grad_buffers)
    assert torch.equal(got[0], want[0])
    for a, b in zip(got[1] + got[2], want[1] + want[2]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("grad_buffers", [0, 2])
def test_final_gradients_start_their_update_in_grad_ready(grad_buffers):
    """No clipping, no loss scale: each update starts as its gradient arrives (before step);
    same bits as the inline step, pool places beyond the pool copied by the worker."""
    want = _run(False, torch.bfloat16, grad_buffers, final=True)
    stepper = OffloadStepper({"device": "cpu"}, grad_buffers=grad_buffers)
    driver = FlatDriver(tiny_model(), 5, lp_dtype=torch.bfloat16)
    stepper.setup(driver.parts, [dict(GROUP)])
    started = []
    inner = stepper._cpu_adam
    stepper._cpu_adam = lambda part, *a, **k: (started.append(part.index), inner(part, *a, **k))
    x, y = batch(0)
    nn.functional.mse_loss(driver.model(x), y).backward()
    grads = driver.grads()
    for part, g in zip(driver.parts, grads):
        stepper.grad_ready(part.index, g, early_copy=True, final=True)
    stepper.wait_partition(driver.parts[-1].index)  # updated before step() is called
    assert started == [p.index for p in driver.parts]
    with pytest.raises(RuntimeError, match="final"):
        stepper.step(grads, grad_scale=0.5)
    stepper.close()
    got = _run(True, torch.bfloat16, grad_buffers, final=True)
    for a, b in zip(got[1] + got[2], want[1] + want[2]):
        assert torch.equal(a, b)


def test_lr_changed_right_after_step_reaches_the_next_update_only():
    """An LR scheduler steps while the update is still held on the worker thread."""

    def schedule(group_holder):
        def on_step(s):
            group_holder[0]["lr"] = LR / (s + 2)

        return on_step

    results = []
    for overlapped in (False, True):
        stepper = OffloadStepper({"device": "cpu", "overlap": overlapped})
        driver = FlatDriver(tiny_model(), 3)
        groups = [dict(GROUP)]
        stepper.setup(driver.parts, groups)
        _train(stepper, driver, 4, overlapped, on_step=schedule(groups))
        stepper.close()
        results.append(driver.flat.clone())
    assert torch.equal(results[0], results[1])


def test_prefer_order_updates_in_the_callers_order():
    stepper = OffloadStepper({"device": "cpu"})
    driver = FlatDriver(tiny_model(), 4)
    stepper.setup(driver.parts, [dict(GROUP)])
    stepper.prefer_order([2, 0, 99])
    assert stepper._order == [2, 0, 1, 3]
    seen = []
    inner = stepper._cpu_adam
    stepper._cpu_adam = lambda part, *a, **k: (seen.append(part.index), inner(part, *a, **k))
    _train(stepper, driver, 1, overlapped=False)
    assert seen == [2, 0, 1, 3]
    stepper.close()


def test_worker_error_is_raised_in_the_caller():
    stepper = OffloadStepper({"device": "cpu"})
    driver = FlatDriver(tiny_model(), 2)
    stepper.setup(driver.parts, [dict(GROUP)])

    def broken(*args, **kwargs):
        raise OSError("disk on fire")

    stepper._cpu_adam = broken
    grads = [torch.ones_like(p.master) for p in driver.parts]
    stepper.step(grads, grad_scale=1.0, wait=False)
    with pytest.raises(RuntimeError, match="worker thread") as err:
        stepper.wait_partition(0)
    assert isinstance(err.value.__cause__, OSError)
    with pytest.raises(RuntimeError, match="worker thread"):
        stepper.synchronize()  # raised once more where the caller finishes the step
    stepper.close()  # then the stepper closes cleanly


# ---------------------------------------------------------------- delayed update


def _delayed_reference(steps):
    """AdamW whose gradient of step k is taken at the parameters before update k-1."""
    model = tiny_model()
    master = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    opt = torch.optim.AdamW(master, lr=LR, weight_decay=0.1, foreach=False)
    for s in range(steps):
        before = [m.detach().clone() for m in master]  # what the next forward will use
        x, y = batch(s)
        nn.functional.mse_loss(model(x), y).backward()
        for m, p in zip(master, model.parameters()):
            m.grad = p.grad * 0.5
            p.grad = None
        opt.step()
        with torch.no_grad():
            for p, b in zip(model.parameters(), before):
                p.copy_(b)
    return torch.cat([m.detach().reshape(-1) for m in master]), torch.cat(
        [p.detach().reshape(-1) for p in model.parameters()]
    )


@pytest.mark.parametrize("overlapped", [False, True])
def test_delayed_update_is_adamw_on_one_step_stale_gradients(overlapped):
    steps = 4
    want_master, want_params = _delayed_reference(steps)
    stepper = OffloadStepper({"device": "cpu", "delayed_update": True})
    assert stepper.grad_buffers == 0  # one host buffer per partition
    driver = FlatDriver(tiny_model(), 3)
    stepper.setup(driver.parts, [dict(GROUP)])
    for s in range(steps):
        if overlapped:
            for part in driver.parts:
                stepper.wait_partition(part.index)
        x, y = batch(s)
        nn.functional.mse_loss(driver.model(x), y).backward()
        grads = driver.grads()
        for part, g in zip(driver.parts, grads):
            stepper.grad_ready(part.index, g, early_copy=True)
        stepper.step(grads, grad_scale=0.5, wait=not overlapped)
        driver.sync()
    stepper.synchronize()
    master = torch.cat([stepper.state_tensors(p.index)["master"] for p in driver.parts])
    torch.testing.assert_close(master, want_master, atol=1e-6, rtol=0)
    # the parameters lag the masters by the last update until the next step publishes it
    torch.testing.assert_close(driver.flat, want_params, atol=1e-6, rtol=0)
    assert not torch.equal(driver.flat, master)
    stepper.close()


def test_delayed_update_stages_low_precision_shards():
    stepper = OffloadStepper({"device": "cpu", "delayed_update": True})
    driver = FlatDriver(tiny_model(), 2, lp_dtype=torch.bfloat16)
    before = [p.param_shard.clone() for p in driver.parts]
    stepper.setup(driver.parts, [dict(GROUP)])
    grads = [torch.ones_like(p.master) for p in driver.parts]
    stepper.step(grads, grad_scale=1.0)
    stepper.synchronize()
    assert all(torch.equal(p.param_shard, b) for p, b in zip(driver.parts, before))
    masters = [stepper.state_tensors(p.index)["master"].clone() for p in driver.parts]
    stepper.step(grads, grad_scale=1.0)  # publishes the first update
    for part, m in zip(driver.parts, masters):
        assert torch.equal(part.param_shard, m.to(torch.bfloat16))
    stepper.close()


def test_delayed_update_needs_device_cpu(tmp_path):
    with pytest.raises(ValueError, match="delayed_update needs device 'cpu'"):
        OffloadStepper({"device": "nvme", "nvme_path": str(tmp_path), "delayed_update": True})


# ---------------------------------------------------------------- twin-flow split


def _parts(sizes, orders=None):
    return [
        Part(i, 0, torch.zeros(n), None) if orders is None else _Ordered(i, n, orders[i])
        for i, n in enumerate(sizes)
    ]


class _Ordered(Part):
    def __init__(self, index, n, order):
        super().__init__(index, 0, torch.zeros(n), None)
        self.order = order


def test_ratio_offloads_the_last_part_of_the_model_like_deepspeed():
    # DeepSpeed: sub-groups i >= int((1 - ratio) * N) go to the CPU, the first stay on the GPU
    assert split(_parts([10] * 4), 0.5) == ([2, 3], [0, 1])
    assert split(_parts([10] * 4), 0.25) == ([3], [0, 1, 2])
    assert split(_parts([10] * 4), 1.0) == ([0, 1, 2, 3], [])
    assert split(_parts([10] * 4), 0.0) == ([], [0, 1, 2, 3])
    # model order, not partition index (ZeRO's stage 1-2 buckets run in reverse model order)
    assert split(_parts([10] * 4, orders=[30, 20, 10, 0]), 0.5) == ([0, 1], [2, 3])
    # by elements: a big first partition is one of several quarters
    assert split(_parts([30, 10, 10, 10, 20]), 0.5) == ([2, 3, 4], [0, 1])


def test_ratio_auto_on_the_cpu_offloads_everything():
    assert resolve_ratio("auto", _parts([10, 10])) == 1.0
    assert resolve_ratio(0.3, _parts([10, 10])) == 0.3
    stepper = OffloadStepper({"device": "cpu", "ratio": "auto"})
    driver = FlatDriver(tiny_model(), 3)
    stepper.setup(driver.parts, [dict(GROUP)])
    assert stepper.ratio == 1.0 and stepper.on_device == []
    stepper.close()
    for bad in ("half", 1.5, -0.1):
        with pytest.raises(ValueError, match="ratio"):
            OffloadStepper({"device": "cpu", "ratio": bad})


@pytest.mark.parametrize("overlapped", [False, True])
def test_twin_flow_half_on_device_matches_all_on_cpu(overlapped):
    want = _run(overlapped)
    stepper = OffloadStepper({"device": "cpu", "ratio": 0.5, "overlap": overlapped})
    driver = FlatDriver(tiny_model(), 4)
    stepper.setup(driver.parts, [dict(GROUP)])
    assert stepper.on_device == [0, 1] and stepper.offloaded == [2, 3]
    _train(stepper, driver, 4, overlapped)
    # torch's AdamW on the device half, CPU Adam on the rest: equal to fp32 rounding
    torch.testing.assert_close(driver.flat, want[0], atol=1e-6, rtol=1e-6)
    state = stepper.state_tensors(0)
    assert state["step"].item() == 4 and state["exp_avg"].abs().sum() > 0
    stepper.close()


def test_super_offload_takes_its_share_of_the_cores():
    from ds_offload import cpu_optimizer_threads

    s = OffloadStepper({"device": "cpu", "super_offload": True, "cpuadam_cores_perc": 0.5})
    assert s.overlaps_step and s.num_threads == max(1, int(0.5 * cpu_optimizer_threads(0)))
    s = OffloadStepper({"device": "cpu", "super_offload": True, "num_threads": 3})
    assert s.num_threads == 3
