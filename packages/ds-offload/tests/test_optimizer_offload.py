"""Optimizer offload (CPU and NVMe) trains to the same parameters as torch's AdamW."""

import pytest
import torch
from _zero_like import FlatDriver, offload_train, reference_params, tiny_model

from ds_offload import OffloadStepper

STEPS = 5
LR = 1e-2


def _reference(steps=STEPS, world=1, groups=None, kind="adamw"):
    model = tiny_model()
    cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    params = groups(model) if groups else model.parameters()
    opt = cls(params, lr=LR, weight_decay=0.1, foreach=False)
    return reference_params(model, opt, steps, world)


def _config(device, tmp_path, **extra):
    cfg = {"device": device, **extra}
    if device == "nvme":
        cfg["nvme_path"] = str(tmp_path)
    return cfg


@pytest.mark.parametrize("device", ["cpu", "nvme"])
@pytest.mark.parametrize("grad_buffers", [0, 1, 3])
def test_rotating_gradient_buffers_match_one_per_partition(tmp_path, device, grad_buffers):
    """9 partitions through 0 (one per partition), 1 or 3 rotating host gradient buffers."""
    stepper = OffloadStepper(_config(device, tmp_path, buffer_count=2), grad_buffers=grad_buffers)
    driver = FlatDriver(tiny_model(), 9)
    stepper.setup(
        driver.parts, [{"lr": LR, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1}]
    )
    assert len(stepper._grad_pool) == grad_buffers
    assert len(stepper._grad_host) == (9 if grad_buffers == 0 else 0)
    got = offload_train(driver, stepper, STEPS)
    stepper.close()
    torch.testing.assert_close(got, _reference(), atol=1e-6, rtol=0)


def test_default_gradient_buffers_follow_the_host_memory(tmp_path, monkeypatch):
    """grad_buffers=None: one host buffer per partition (no gradient waits on the device for a
    pool buffer) where the state and those buffers fit in 2/3 of the available host memory;
    the rotating pool where they do not, or where the store is NVMe."""
    import ds_offload._stepper as stepper_mod

    need = 16 * sum(p.numel() for p in tiny_model().parameters())
    for available, device, want in [
        (int(need * 1.5), "cpu", 0), (int(need * 1.4), "cpu", 4), (0, "cpu", 4),
        (10 * need, "nvme", 4),
    ]:  # fmt: skip
        monkeypatch.setattr(stepper_mod, "host_available_bytes", lambda a=available: a)
        stepper = OffloadStepper(_config(device, tmp_path, buffer_count=2))
        driver = FlatDriver(tiny_model(), 9)
        stepper.setup(driver.parts, [{"lr": LR}])
        assert stepper.grad_buffers == want, (available, device)
        assert len(stepper._grad_pool) == want
        assert len(stepper._grad_host) == (9 if want == 0 else 0)
        stepper.close()


def test_gradient_pool_not_used_where_it_would_not_save_memory():
    # 2 partitions, 4 buffers of the largest: one buffer per partition instead
    stepper = OffloadStepper({"device": "cpu"}, grad_buffers=4)
    driver = FlatDriver(tiny_model(), 2)
    stepper.setup(driver.parts, [{"lr": LR}])
    assert stepper._grad_pool == [] and len(stepper._grad_host) == 2
    with pytest.raises(ValueError, match="grad_buffers must be >= 0"):
        OffloadStepper({"device": "cpu"}, grad_buffers=-1)


@pytest.mark.parametrize("device", ["cpu", "nvme"])
@pytest.mark.parametrize("nparts", [1, 3])
def test_matches_torch_adamw(tmp_path, device, nparts):
    stepper = OffloadStepper(_config(device, tmp_path, buffer_count=2), aio={"block_size": 4096})
    driver = FlatDriver(tiny_model(), nparts)
    stepper.setup(
        driver.parts, [{"lr": LR, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1}]
    )
    got = offload_train(driver, stepper, STEPS)
    stepper.close()
    torch.testing.assert_close(got, _reference(), atol=1e-6, rtol=0)


def test_adam_l2_and_param_groups_and_lr_changes(tmp_path):
    # two groups with different lr / weight decay; the lr of group 1 changes after step 2 (as an
    # LR scheduler would, through the live group dicts)
    model = tiny_model()
    n_first = sum(p.numel() for p in list(model.parameters())[:2])

    def groups(m):
        ps = list(m.parameters())
        return [{"params": ps[:2], "lr": LR}, {"params": ps[2:], "lr": LR / 2, "weight_decay": 0.0}]

    ref_model = tiny_model()
    ref_opt = torch.optim.Adam(groups(ref_model), lr=LR, weight_decay=0.1, foreach=False)
    from _zero_like import batch

    for s in range(STEPS):
        ref_opt.zero_grad()
        x, y = batch(s)
        torch.nn.functional.mse_loss(ref_model(x), y).backward()
        ref_opt.step()
        if s == 2:
            ref_opt.param_groups[1]["lr"] = LR / 10
    want = torch.cat([p.detach().reshape(-1) for p in ref_model.parameters()])

    group_opts = [
        {"lr": LR, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1},
        {"lr": LR / 2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
    ]
    # partition boundaries on the group boundary: one partition per group
    driver = FlatDriver(model, 1)
    n = driver.flat.numel()
    from _zero_like import Part

    driver.bounds = [(0, n_first), (n_first, n)]
    driver.owned = [0, 1]
    driver.parts = [
        Part(0, 0, driver.flat[:n_first], None),
        Part(1, 1, driver.flat[n_first:], None),
    ]
    stepper = OffloadStepper({"device": "cpu"}, optimizer="adam")
    stepper.setup(driver.parts, group_opts)

    def change_lr(s):
        if s == 2:
            group_opts[1]["lr"] = LR / 10

    got = offload_train(driver, stepper, STEPS, on_step=change_lr)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_partial_offload_ratio(tmp_path, ratio):
    stepper = OffloadStepper({"device": "cpu", "ratio": ratio})
    driver = FlatDriver(tiny_model(), 4)
    stepper.setup(driver.parts, [{"lr": LR, "weight_decay": 0.1}])
    if ratio == 0.0:
        assert stepper.offloaded == [] and len(stepper.on_device) == 4
    else:
        assert 0 < len(stepper.offloaded) < 4
    got = offload_train(driver, stepper, STEPS)
    torch.testing.assert_close(got, _reference(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", ["cpu", "nvme"])
def test_low_precision_param_shards(tmp_path, device):
    stepper = OffloadStepper(_config(device, tmp_path))
    driver = FlatDriver(tiny_model(), 3, lp_dtype=torch.bfloat16)
    stepper.setup(driver.parts, [{"lr": LR, "weight_decay": 0.1}])
    got = offload_train(driver, stepper, 3)
    # the fp32 master is where the real values are; the shard is its bf16 rounding
    for part in driver.parts:
        master = stepper.state_tensors(part.index)["master"]
        assert part.param_shard.dtype == torch.bfloat16
        assert torch.equal(part.param_shard, master.to(torch.bfloat16))
    # the driver's flat fp32 buffer is not touched when shards exist
    assert torch.equal(got, torch.cat([p.reshape(-1) for p in tiny_model().parameters()]).detach())
    stepper.close()


@pytest.mark.parametrize("device", ["cpu", "nvme"])
@pytest.mark.parametrize("grad_buffers", [0, 2])
def test_grad_scale_with_early_copies(tmp_path, device, grad_buffers):
    """grad_ready(early_copy=True) copies unscaled grads as they arrive (backward order: last
    partition first; one partition never arrives early), step(grad_scale=) applies the factor;
    a skipped step (skip_step) forgets its early copies."""
    stepper = OffloadStepper(_config(device, tmp_path, buffer_count=2), grad_buffers=grad_buffers)
    driver = FlatDriver(tiny_model(), 7)
    stepper.setup(driver.parts, [{"lr": LR, "weight_decay": 0.1}])
    from _zero_like import batch

    parts = driver.parts
    for s in range(STEPS):
        x, y = batch(s)
        if s == 2:  # an overflowed step: garbage copied early, then skipped
            (torch.nn.functional.mse_loss(driver.model(x), y) * 1e9).backward()
            for part, g in zip(parts, driver.grads()):
                stepper.grad_ready(part.index, g, early_copy=True)
            stepper.skip_step()
            for p in driver.params:
                p.grad = None
        (torch.nn.functional.mse_loss(driver.model(x), y) * 1024.0).backward()
        grads = driver.grads()
        # backward order, last partition first; partition 0 never arrives early
        for arrived, (part, g) in enumerate(reversed(list(zip(parts, grads))[1:])):
            stepper.grad_ready(part.index, g, early_copy=True)
            copied = grad_buffers == 0 or arrived < grad_buffers
            assert stepper.holds_grad(part.index) == copied
            if copied:
                g.fill_(float("nan"))  # copied already: the stepper must not read it again
        assert not stepper.holds_grad(parts[0].index)
        if s == 1:  # a caller that dropped the copied gradients passes None for them
            grads = [None if stepper.holds_grad(p.index) else g for p, g in zip(parts, grads)]
            with pytest.raises(ValueError, match="None but this stepper holds no copy"):
                stepper.step([None, *grads[1:]], grad_scale=torch.tensor(1 / 1024.0))
        stepper.step(grads, grad_scale=torch.tensor(1 / 1024.0))
        assert stepper._order[0] == parts[-1].index  # updated in arrival order
        driver.sync()
    stepper.close()
    torch.testing.assert_close(driver.flat, _reference(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", ["cpu", "nvme"])
def test_checkpoint_round_trip_through_state_tensors(tmp_path, device):
    cfg = {"lr": LR, "weight_decay": 0.1}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = OffloadStepper(_config(device, tmp_path / "a"))
    da = FlatDriver(tiny_model(), 3)
    a.setup(da.parts, [cfg])
    offload_train(da, a, 3)
    saved = {p.index: {k: v.clone() for k, v in a.state_tensors(p.index).items()} for p in da.parts}
    assert set(saved[0]) == {"master", "exp_avg", "exp_avg_sq", "step"}
    assert float(saved[0]["step"]) == 3.0
    # a fresh stepper over a differently initialised model, loaded from the checkpoint
    b = OffloadStepper(_config(device, tmp_path / "b"))
    db = FlatDriver(tiny_model(seed=7), 3)
    b.setup(db.parts, [cfg])
    for p in db.parts:
        for k, t in b.state_tensors(p.index).items():
            t.copy_(saved[p.index][k])
    b.state_loaded()
    assert torch.equal(db.flat, da.flat)

    def cont(driver, stepper):
        from _zero_like import batch

        for s in range(3, 5):
            x, y = batch(s)
            torch.nn.functional.mse_loss(driver.model(x), y).backward()
            stepper.step(driver.grads())
            driver.sync()
        return driver.flat

    torch.testing.assert_close(cont(da, a), cont(db, b), atol=0, rtol=0)
    torch.testing.assert_close(db.flat, _reference(), atol=1e-6, rtol=0)
    a.close()
    b.close()


def test_bad_input():
    with pytest.raises(ValueError, match="offload_optimizer.device"):
        OffloadStepper({"device": "none"})
    with pytest.raises(ValueError, match="offload_optimizer.ratio"):
        OffloadStepper({"device": "cpu", "ratio": 1.5})
    with pytest.raises(ValueError, match="nvme_path is not set"):
        OffloadStepper({"device": "nvme"})
    with pytest.raises(ValueError, match="'adam' or 'adamw'"):
        OffloadStepper({"device": "cpu"}, optimizer="sgd")
    s = OffloadStepper({"device": "cpu"})
    driver = FlatDriver(tiny_model(), 2)
    with pytest.raises(ValueError, match="amsgrad"):
        s.setup(driver.parts, [{"amsgrad": True}])
    s.setup(driver.parts, [{}])
    with pytest.raises(ValueError, match="got 1 gradients for 2 partitions"):
        s.step([torch.zeros(3)])


@pytest.mark.parametrize("max_in_cpu", [1, 700, 10**9])
def test_state_split_between_cpu_and_nvme(tmp_path, max_in_cpu):
    """device nvme + max_in_cpu (ds_offload extension): the first partitions up to max_in_cpu
    elements stay in CPU memory, the rest are swapped; training and checkpoints as with either."""
    stepper = OffloadStepper(_config("nvme", tmp_path, buffer_count=2, max_in_cpu=max_in_cpu))
    driver = FlatDriver(tiny_model(), 5)
    stepper.setup(
        driver.parts, [{"lr": LR, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1}]
    )
    sizes = [p.master.numel() for p in driver.parts]
    on_cpu = [stepper.store.swapped(p.index) is False for p in driver.parts]
    # a prefix of the partitions, as many as fit
    k = next((j for j, c in enumerate(on_cpu) if not c), len(on_cpu))
    assert all(on_cpu[:k]) and not any(on_cpu[k:])
    assert sum(sizes[:k]) <= max_in_cpu and (k == len(sizes) or sum(sizes[: k + 1]) > max_in_cpu)
    swap_files = [f for f in tmp_path.rglob("*.bin")]
    assert len(swap_files) == len(sizes) - k
    got = offload_train(driver, stepper, STEPS)
    torch.testing.assert_close(got, _reference(), atol=1e-6, rtol=0)
    # state_tensors / state_loaded reach both halves
    before = {p.index: stepper.state_tensors(p.index)["exp_avg"].clone() for p in driver.parts}
    for p in driver.parts:
        stepper.state_tensors(p.index)["exp_avg"].mul_(2.0)
    stepper.state_loaded()
    for p in driver.parts:
        torch.testing.assert_close(stepper.state_tensors(p.index)["exp_avg"], 2 * before[p.index])
    stepper.close()
    assert not list(tmp_path.rglob("*.bin"))


def test_max_in_cpu_needs_nvme(tmp_path):
    with pytest.raises(ValueError, match=r"offload_optimizer.max_in_cpu .* needs device 'nvme'"):
        OffloadStepper({"device": "cpu", "max_in_cpu": 10})
    with pytest.raises(ValueError, match=r"max_in_cpu"):
        OffloadStepper({"device": "nvme", "nvme_path": str(tmp_path), "max_in_cpu": -1})
