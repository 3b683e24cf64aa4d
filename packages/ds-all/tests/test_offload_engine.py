"""zero_optimization.offload_optimizer through the engine: the same losses and parameters as
training without offload (fp32, CPU and NVMe to a temporary directory), schedule included."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from _models import TinyGPT, batch, config  # noqa: E402


def _train(
    stage: int, zero_extra: dict, steps: int, bf16: bool = False
) -> tuple[object, list[float]]:
    """(engine, losses) of ``steps`` engine steps of TinyGPT at ZeRO ``stage``."""
    import ds_all

    torch.manual_seed(0)
    cfg = config(stage, 4)
    cfg["zero_optimization"].update(zero_extra)
    if bf16:
        cfg["bf16"] = {"enabled": True}
    engine, _, _, _ = ds_all.initialize(model=TinyGPT(), config=cfg, dist_init_required=False)
    losses = []
    for step in range(steps):
        x, y = batch(step, 4)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return engine, losses


def _run(zero_extra: dict) -> tuple[list[float], dict[str, torch.Tensor]]:
    engine, losses = _train(2, zero_extra, steps=4)
    return losses, engine.zero.full_state_dict()


@pytest.mark.parametrize("device", ["cpu", "nvme", "nvme+cpu"])
def test_offload_matches_on_device_optimizer(device, tmp_path):
    ref_losses, ref_state = _run({})
    extra = {"offload_optimizer": {"device": device, "pin_memory": False}}
    if device == "nvme+cpu":  # ds_offload's max_in_cpu: the state split between CPU and NVMe
        extra["offload_optimizer"].update(device="nvme", max_in_cpu=4000)
    if device.startswith("nvme"):
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


def _bf16_run(stage: int, offload: bool, steps: int = 3):
    import ds_offload
    import ds_zero

    torch.manual_seed(0)
    model = TinyGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    stepper = ds_offload.OffloadStepper({"device": "cpu", "pin_memory": False}) if offload else None
    zero = ds_zero.wrap(
        model, opt, ds_zero.ZeroOptions(stage=stage, param_dtype=torch.bfloat16), stepper=stepper
    )
    before = zero.full_state_dict()
    for step in range(steps):
        x, y = batch(step, 4)
        zero.backward(zero(x, y).float())
        zero.step()
    return zero, before


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_offload_masters_are_read_and_written_through_the_stepper(stage):
    """bf16 compute weights: the fp32 masters live only in the offload stepper. full_state_dict
    reads them there (it returned ZeRO's stale device copy before), load_full_state_dict and
    GatheredParameters write there, and ZeRO's device copy is freed."""
    import ds_zero

    ref, _ = _bf16_run(stage, offload=False)
    zero, before = _bf16_run(stage, offload=True)
    got, want = zero.full_state_dict(), ref.full_state_dict()
    assert any(not torch.equal(before[k], got[k]) for k in got), "masters never changed"
    for k in want:  # CPU Adam against torch AdamW on the same fp32 masters
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    assert all(b.master.untyped_storage().size() == 0 for b in zero.trainable)
    # a consolidated load lands in the stepper's masters and the bf16 weights
    zero.load_full_state_dict(before)
    after = zero.full_state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    # a modification through GatheredParameters survives the next step's update source
    w = zero.module.head.weight if hasattr(zero.module, "head") else next(zero.module.parameters())
    # one stepper commit when GatheredParameters exits, however many parameters it wrote back
    assert len({id(b.master_commit) for b in zero.trainable}) == 1
    others = [p for p in zero.module.parameters() if p is not w][:2]
    commits = []
    real_loaded = zero.stepper.state_loaded

    def counting() -> None:
        commits.append(1)
        real_loaded()

    for b in zero.trainable:
        b.master_commit = counting
    with ds_zero.GatheredParameters([w, *others], modifier_rank=0):
        w.data.fill_(0.25)
    assert len(commits) == 1
    name = next(n for n, p in zero.module.named_parameters() if p is w)
    assert torch.equal(zero.full_state_dict()[name], torch.full_like(before[name], 0.25))


def _stage3_run(offload_param: dict | None, offload_optimizer: bool, bf16: bool = False):
    zero_extra: dict = {"stage3_param_persistence_threshold": 0}  # every parameter partitioned
    if offload_param is not None:
        zero_extra["offload_param"] = offload_param
    if offload_optimizer:
        zero_extra["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    return _train(3, zero_extra, steps=3, bf16=bf16)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("offload_optimizer", [False, True])
def test_offload_param_cpu_keeps_stage3_shards_on_the_host(offload_optimizer, bf16):
    ref, ref_losses = _stage3_run(None, offload_optimizer, bf16)
    engine, losses = _stage3_run({"device": "cpu", "pin_memory": False}, offload_optimizer, bf16)
    assert engine.zero.options.host_param_shards
    if offload_optimizer and bf16:
        # CPU Adam writes the bf16 values straight into the host shards (no staging buffer)
        stepper = engine.zero.stepper
        shards = {b.local_shard.data_ptr() for b in engine.zero.trainable}
        assert {t.data_ptr() for t in stepper._lp_host.values()} == shards
    assert all(b.local_shard.device.type == "cpu" for b in engine.zero.buckets if b.shard_params)
    assert losses == ref_losses
    want = ref.zero.full_state_dict()
    for k, v in engine.zero.full_state_dict().items():
        assert torch.equal(v, want[k]), k


def test_offload_param_needs_stage_3_and_nvme_falls_back_to_cpu():
    import ds_all

    cfg = config(2, 4)
    cfg["zero_optimization"]["offload_param"] = {"device": "cpu"}
    with pytest.raises(ds_all.ConfigError, match=r"offload_param\.device is 'cpu' with .*stage 2"):
        ds_all.initialize(model=TinyGPT(), config=cfg, dist_init_required=False)
    with pytest.warns(UserWarning, match="kept in CPU memory instead"):
        engine, _ = _stage3_run({"device": "nvme", "nvme_path": "/tmp"}, False)
    assert engine.zero.options.host_param_shards


def test_offload_param_section_is_read_by_ds_offload():
    """pin_memory's default and "auto" are ds_offload's (true, DeepSpeed's default), and the
    section's own checks apply: nvme without nvme_path is a ConfigError naming the key."""
    import ds_all

    for section in ({"device": "cpu"}, {"device": "cpu", "pin_memory": "auto"}):
        engine, _ = _stage3_run(section, False)
        assert engine.zero.options.pin_param_shards, section
    engine, _ = _stage3_run({"device": "cpu", "pin_memory": False}, False)
    assert not engine.zero.options.pin_param_shards
    cfg = config(3, 4)
    cfg["zero_optimization"]["offload_param"] = {"device": "nvme"}
    with pytest.raises(ds_all.ConfigError, match="offload_param: .*nvme_path is not set"):
        ds_all.initialize(model=TinyGPT(), config=cfg, dist_init_required=False)


@pytest.mark.parametrize("host_room", [False, True], ids=["host-short", "host-room"])
def test_zero3_cpu_offload_host_bytes_per_parameter(host_room, monkeypatch):
    """ZeRO-3 + offload_optimizer cpu + offload_param cpu, bf16: per parameter the host holds
    the fp32 master and two moments (12 bytes) and the bf16 shard (2); CPU Adam writes into the
    shard itself. Gradients: where the host has room, one host buffer per partition (bf16, 2
    bytes: on one rank ZeRO hands the gradient over in bf16 exactly; DeepSpeed's are fp32) and
    no reduced gradient stays on the device past its copy; where it has not, 4 rotating bf16
    buffers of the largest partition and the gradients that found no free buffer wait on the
    device until the step. Both train to the same bits (clipping on)."""
    import ds_all
    import ds_offload._stepper as stepper_mod

    available = 1 << 50 if host_room else 0
    monkeypatch.setattr(stepper_mod, "host_available_bytes", lambda: available)
    torch.manual_seed(0)
    cfg = config(3, 4)
    cfg["bf16"] = {"enabled": True}
    cfg["zero_optimization"].update(
        stage3_param_persistence_threshold=0, reduce_bucket_size=10**9,
        offload_optimizer={"device": "cpu", "pin_memory": False},
        offload_param={"device": "cpu", "pin_memory": False},
    )  # fmt: skip
    engine, _, _, _ = ds_all.initialize(
        model=TinyGPT(layers=8), config=cfg, dist_init_required=False
    )
    stepper = engine.zero.stepper
    n = sum(b.layout.shard_numel for b in engine.zero.trainable)
    state = sum(
        t.numel() * t.element_size() for d in stepper.store.state.values() for t in d.values()
    )
    shards = sum(b.local_shard.numel() * 2 for b in engine.zero.trainable)
    staging = {t.data_ptr() for t in stepper._lp_host.values()}
    assert staging == {b.local_shard.data_ptr() for b in engine.zero.trainable}  # no copies
    assert state == 12 * n and shards == 2 * n
    pool = sum(t.numel() * t.element_size() for t in stepper._grad_pool)
    grad_dtypes = {t.dtype for t in [*stepper._grad_pool, *stepper._grad_host.values()]}
    assert grad_dtypes == {torch.bfloat16}
    largest = max(b.layout.shard_numel for b in engine.zero.trainable)
    if host_room:
        assert stepper.grad_buffers == 0 and not stepper._grad_pool
        assert sum(t.numel() * 2 for t in stepper._grad_host.values()) == 2 * n
    else:
        assert len(stepper._grad_pool) == 4 and pool == 8 * largest and not stepper._grad_host
        assert pool < 2 * n  # less than one gradient buffer per partition would take
    for step in range(2):
        x, y = batch(step, 4)
        engine.backward(engine(x, y))
        kept = [b.grad_shard is not None for b in engine.zero.trainable]
        # host room: every gradient copied and dropped; pool: only the first 4 of the update
        # order found a buffer
        assert sum(kept) == (0 if host_room else len(kept) - 4)
        engine.step()
    return_state = engine.zero.full_state_dict()
    monkeypatch.setattr(stepper_mod, "host_available_bytes", lambda: 0 if host_room else 1 << 50)
    torch.manual_seed(0)
    other, _, _, _ = ds_all.initialize(
        model=TinyGPT(layers=8), config=cfg, dist_init_required=False
    )
    assert other.zero.stepper.grad_buffers == (4 if host_room else 0)
    for step in range(2):
        x, y = batch(step, 4)
        other.backward(other(x, y))
        other.step()
    for k, v in other.zero.full_state_dict().items():
        assert torch.equal(v, return_state[k]), k


def test_engine_close_removes_the_offload_swap_files(tmp_path):
    engine, _ = _train(3, {"stage3_param_persistence_threshold": 0,
                           "offload_optimizer": {"device": "nvme", "nvme_path": str(tmp_path)},
                           "offload_param": {"device": "nvme", "nvme_path": str(tmp_path),
                                             "max_in_cpu": 0}}, steps=1)  # fmt: skip
    made = sorted(p.name.split("_")[2] for p in tmp_path.iterdir())
    assert made == ["optim", "param"]  # one swap directory each
    engine.close()
    assert list(tmp_path.iterdir()) == []


def test_engine_logs_where_the_offloaded_state_lives(tmp_path):
    import logging

    from ds_all._engine import _offload_plan

    class Keep(logging.Handler):  # on ds_all's own logger: it does not propagate to the root
        def __init__(self) -> None:
            super().__init__(logging.INFO)
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    keep = Keep()
    logger = logging.getLogger("ds_all")
    logger.addHandler(keep)
    level = logger.level
    logger.setLevel(logging.INFO)
    engine, _ = _train(3, {"stage3_param_persistence_threshold": 0,
                           "offload_optimizer": {"device": "nvme", "nvme_path": str(tmp_path),
                                                 "max_in_cpu": 4000, "num_threads": 2},
                           "offload_param": {"device": "cpu"}}, steps=1)  # fmt: skip
    assert engine.zero.stepper.num_threads == 2  # ds_offload's extension key reaches CPU Adam
    plan = _offload_plan(engine.zero)
    n = sum(b.layout.shard_numel for b in engine.zero.trainable)
    assert plan["optimizer_state_host"] + plan["optimizer_state_nvme"] == 12 * n
    assert 0 < plan["optimizer_state_host"] < 12 * n  # split by max_in_cpu
    assert plan["param_shards_host"] == 4 * n  # fp32 shards (no bf16 in this config)
    assert plan["optimizer_swap_buffers"] > 0 and plan["gradient_buffers"] > 0
    logger.removeHandler(keep)
    logger.setLevel(level)
    line = next(r.getMessage() for r in keep.records if "offload (rank 0)" in r.getMessage())
    assert "of host memory" in line and "on NVMe" in line and "optimizer state nvme" in line
    assert line.endswith("; CPU optimizer threads 2")
    engine.close()
