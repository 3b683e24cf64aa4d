"""Run under torchrun: init_distributed reads the torchrun variables and picks the accelerator's
backend (gloo on a CPU machine)."""

import os

import torch

import ds_comm
from ds_comm import Source


def main() -> None:
    layout = ds_comm.init_distributed()
    assert layout.source is Source.ENV
    assert layout.rank == int(os.environ["RANK"]) and layout.world_size == 2
    import torch.distributed as dist

    from ds_accel import get_accelerator

    assert dist.get_backend() == get_accelerator().communication_backend_name()
    t = torch.ones(4) * (layout.rank + 1)
    ds_comm.all_reduce(t)
    assert torch.equal(t, torch.full((4,), 3.0))
    again = ds_comm.init_distributed()
    assert again.source is Source.EXISTING and again.rank == layout.rank
    print(f"TORCHRUN-OK rank={layout.rank}", flush=True)
    ds_comm.destroy_process_group()


if __name__ == "__main__":
    main()
