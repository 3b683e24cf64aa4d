"""ZeRO-Infinity through the engine: ``offload_param: {device: nvme}`` with an offloaded
optimizer keeps stage 3's parameter shards in swap files (ds_offload.NvmeParamStore). Training
gives the same losses and weights as host shards (bitwise) and as plain PyTorch (fp32, 1e-6), on
one and two ranks; checkpoints, consolidated loads and GatheredParameters edits reach the
shards on NVMe."""

from __future__ import annotations

import os
import sys
import tempfile

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from _models import TinyGPT, batch, config, reference  # noqa: E402

from ds_comm.testing import run_distributed  # noqa: E402

STEPS = 4


def _zero(param_device: str, nvme: str, opt_device: str = "cpu") -> dict:
    opt = {"device": opt_device, "pin_memory": False}
    if opt_device == "nvme":
        opt["nvme_path"] = nvme
    param = {"device": param_device, "pin_memory": False}
    if param_device == "nvme":
        # every shard on NVMe, fewer buffers than shards: evictions and read-ahead happen
        param.update(nvme_path=nvme, max_in_cpu=0, buffer_count=2)
    return {"stage3_param_persistence_threshold": 0, "offload_optimizer": opt,
            "offload_param": param}  # fmt: skip


def _engine(zero_extra: dict, bf16: bool = False, layers: int = 4):
    import ds_all

    torch.manual_seed(0)
    cfg = config(3, 4)
    cfg["zero_optimization"].update(zero_extra)
    if bf16:
        cfg["bf16"] = {"enabled": True}
    engine, _, _, _ = ds_all.initialize(
        model=TinyGPT(layers=layers), config=cfg, dist_init_required=False
    )
    return engine


def _steps(engine, first: int, last: int) -> list[float]:
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    out = []
    for step in range(first, last):
        x, y = batch(step, 4 * world)
        sl = slice(rank * 4, (rank + 1) * 4)
        loss = engine(x[sl], y[sl])
        engine.backward(loss)
        engine.step()
        total = loss.detach().float()
        if world > 1:
            dist.all_reduce(total)
            total /= world
        out.append(float(total))
    return out


def _store_buckets(engine) -> list:
    return [b for b in engine.zero.trainable if b.shard_store is not None]


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("opt_device", ["cpu", "nvme"])
def test_nvme_shards_train_like_host_shards(tmp_path, bf16, opt_device):
    ref = _engine(_zero("cpu", str(tmp_path), opt_device), bf16)
    ref_losses = _steps(ref, 0, STEPS)
    engine = _engine(_zero("nvme", str(tmp_path), opt_device), bf16)
    stored = _store_buckets(engine)
    assert stored and all(b.local_shard is None for b in stored)
    assert all(b.master.untyped_storage().size() == 0 for b in stored)  # device masters freed
    assert _steps(engine, 0, STEPS) == ref_losses
    want = ref.zero.full_state_dict()
    for k, v in engine.zero.full_state_dict().items():
        assert torch.equal(v, want[k]), k
    stats = engine.zero.param_store.stats
    assert stats.on_nvme == len(stored) and stats.resident == 0
    assert stats.prefetched > 0 and stats.writes >= STEPS * len(stored)
    store_dir = engine.zero.param_store.swap.dir
    assert len(list(store_dir.glob("*.bin"))) == len(stored)
    engine.close()
    assert not store_dir.exists()  # swap files removed at close


def test_nvme_shards_match_plain_pytorch_fp32():
    ref_losses, ref_state = reference(STEPS, 1, 4, 1)
    with tempfile.TemporaryDirectory() as d:
        engine = _engine(_zero("nvme", d), layers=2)
        losses = _steps(engine, 0, STEPS)
        state = engine.zero.full_state_dict()
        engine.close()
    assert losses == pytest.approx(ref_losses, rel=1e-6, abs=1e-6)
    for k, v in ref_state.items():
        torch.testing.assert_close(state[k], v, rtol=1e-6, atol=1e-6, msg=k)


def test_checkpoint_round_trip_through_nvme_shards(tmp_path):
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    full = _engine(_zero("nvme", str(nvme)))
    want = _steps(full, 0, 6)
    first = _engine(_zero("nvme", str(nvme)))
    _steps(first, 0, 3)
    first.save_checkpoint(str(tmp_path / "ck"))
    first.close()
    second = _engine(_zero("nvme", str(nvme)))
    second.load_checkpoint(str(tmp_path / "ck"))
    assert _steps(second, 3, 6) == want[3:]  # the loaded masters reached the NVMe shards


def test_consolidated_load_and_gathered_edit_reach_the_shards(tmp_path):
    import ds_zero

    engine = _engine(_zero("nvme", str(tmp_path)))
    host = _engine(_zero("cpu", str(tmp_path)))
    start = engine.zero.full_state_dict()
    _steps(engine, 0, 2)
    _steps(host, 0, 2)
    for e in (engine, host):
        e.zero.load_full_state_dict(start)
        with ds_zero.GatheredParameters(list(e.module.blocks[1].parameters()), modifier_rank=0):
            e.module.blocks[1][1].weight.data.mul_(0.5)
    # the next forwards gather from the stores: the same as from host shards
    assert _steps(engine, 2, 4) == _steps(host, 2, 4)


def _rank_run(param_device: str, nvme_root: str, opt_device: str):
    import torch.distributed as dist

    nvme = os.path.join(nvme_root, f"rank{dist.get_rank()}")
    os.makedirs(nvme, exist_ok=True)
    engine = _engine(_zero(param_device, nvme, opt_device), layers=2)
    losses = _steps(engine, 0, STEPS)
    state = engine.zero.full_state_dict()
    files = engine.zero.param_store.stats.on_nvme if engine.zero.param_store else 0
    engine.close()
    return losses, state, files


def _rank_runs(nvme_root: str):
    """The four runs (parameter shards on NVMe or host, optimizer state on host or NVMe) in one
    pair of processes: starting 2 ranks costs more on the 2-core CI machine than a run."""
    return {
        f"{param}/{opt}": _rank_run(param, os.path.join(nvme_root, f"{param}-{opt}"), opt)
        for opt in ("cpu", "nvme")
        for param in ("nvme", "cpu")
    }


def test_two_ranks_nvme_shards_match_host_shards_and_pytorch(tmp_path):
    per_rank = run_distributed(_rank_runs, 2, args=(str(tmp_path),), timeout=480)
    ref_losses, ref_state = reference(STEPS, 2, 4, 1)
    for opt_device in ("cpu", "nvme"):
        got = [r[f"nvme/{opt_device}"] for r in per_rank]
        host = [r[f"cpu/{opt_device}"] for r in per_rank]
        _check_two_ranks(got, host, ref_losses, ref_state)


def _check_two_ranks(got, host, ref_losses, ref_state):
    for (losses, state, files), (h_losses, h_state, _) in zip(got, host):
        assert files > 0  # each rank's shards were on NVMe
        assert losses == h_losses
        for k, v in h_state.items():
            assert torch.equal(state[k], v), k
        assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
        for k, v in ref_state.items():
            torch.testing.assert_close(state[k], v, rtol=1e-5, atol=1e-6, msg=k)
