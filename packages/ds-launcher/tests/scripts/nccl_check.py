"""A rank on a GPU: NCCL all-reduce of the rank; records its device and visible devices."""

import json
import os
import sys

import torch
import torch.distributed as dist

out = sys.argv[1]
local_rank = int(os.environ["LOCAL_RANK"])
torch.cuda.set_device(local_rank)
dist.init_process_group("nccl")
rank, world = dist.get_rank(), dist.get_world_size()
t = torch.tensor([float(rank)], device="cuda")
dist.all_reduce(t)
torch.cuda.synchronize()
record = {
    "rank": rank,
    "world_size": world,
    "sum": t.item(),
    "device": torch.cuda.current_device(),
    "device_count": torch.cuda.device_count(),
    "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
    "local_rank": local_rank,
}
dist.destroy_process_group()
with open(os.path.join(out, f"rank_{rank}.json"), "w") as f:
    json.dump(record, f)
