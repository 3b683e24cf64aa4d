"""A rank of a real gloo job: all-reduce the rank and record what this rank saw."""

import json
import os
import sys

import torch
import torch.distributed as dist

out = sys.argv[1]
with open(os.path.join(out, f"pid_{os.environ['RANK']}"), "w") as f:
    f.write(str(os.getpid()))
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
t = torch.tensor([float(rank)])
dist.all_reduce(t)
record = {
    "rank": rank,
    "world_size": world,
    "sum": t.item(),
    "env": {
        k: os.environ.get(k)
        for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK")
    },
}
dist.barrier()
dist.destroy_process_group()
with open(os.path.join(out, f"rank_{rank}.json"), "w") as f:
    json.dump(record, f)
