"""Ranks for the --rank_timeout watchdog. Every rank records its pid, then by mode:

- `gloo`: all ranks all-reduce over gloo; rank 0 then exits 0, the last rank hangs outside any
  collective (a sleep), the others exit 0.
- `stop_beating`: every rank beats; the last rank stops beating and hangs after a few beats,
  the others keep beating (and running) until stopped.
- `slow_but_beating`: rank 0 exits 0 at once; the others beat for `seconds` and then exit 0.
"""

import os
import sys
import time

from ds_launcher import heartbeat

out, mode = sys.argv[1], sys.argv[2]
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
with open(os.path.join(out, f"pid_{rank}"), "w") as f:
    f.write(str(os.getpid()))
last = rank == world - 1

if mode == "gloo":
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    t = torch.ones(2)
    dist.all_reduce(t)
    assert t.tolist() == [float(world)] * 2
    dist.destroy_process_group()
    if last:
        time.sleep(120)
elif mode == "stop_beating":
    for _ in range(5):
        heartbeat()
        time.sleep(0.05)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if not last:
            heartbeat()
        time.sleep(0.05)
elif mode == "slow_but_beating":
    seconds = float(sys.argv[3])
    deadline = time.monotonic() + (0 if rank == 0 else seconds)
    while time.monotonic() < deadline:
        heartbeat()
        time.sleep(0.05)
else:
    sys.exit(f"unknown mode {mode!r}")
