"""Offloaded optimizer on several ranks (gloo): each rank steps the partitions it owns on its
own CPU / NVMe state; parameters match single-process AdamW on the averaged gradient."""

import pytest

from ds_comm.testing import distributed_test


def _run(tmp_path, world_size, device):
    import torch
    import torch.distributed as dist
    from _zero_like import FlatDriver, offload_train, reference_params, tiny_model

    from ds_offload import OffloadStepper

    rank = dist.get_rank()
    cfg = {"device": device}
    if device == "nvme":
        path = tmp_path / f"rank{rank}"
        path.mkdir()
        cfg["nvme_path"] = str(path)
    stepper = OffloadStepper(cfg, num_threads=1)
    driver = FlatDriver(tiny_model(), 5, world=world_size, rank=rank)
    stepper.setup(driver.parts, [{"lr": 1e-2, "weight_decay": 0.1}])
    got = offload_train(driver, stepper, 4)
    stepper.close()
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    want = reference_params(model, opt, 4, world=world_size)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@distributed_test(world_size=2, timeout=120)
def test_cpu_and_nvme_offload_ranks(tmp_path, world_size):
    _run(tmp_path, world_size, "cpu")
    _run(tmp_path, world_size, "nvme")


@distributed_test(world_size=2, timeout=60)
def test_two_local_ranks_share_the_cores_under_torchruns_default(world_size):
    import os

    from ds_offload import OffloadStepper
    from ds_offload._threads import usable_cores

    assert os.environ["LOCAL_WORLD_SIZE"] == "2"  # set by the launcher of the ranks
    os.environ["OMP_NUM_THREADS"] = "1"  # what torchrun sets for several processes
    assert OffloadStepper({"device": "cpu"}).num_threads == max(1, usable_cores() // 2)


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
