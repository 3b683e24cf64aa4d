"""4 ranks step through gloo all-reduces; rank FAIL_RANK dies at step 2 (exit code or SIGKILL)."""

import os
import signal
import sys
import time

import torch
import torch.distributed as dist

out, how = sys.argv[1], sys.argv[2]
rank = int(os.environ["RANK"])
with open(os.path.join(out, f"pid_{rank}"), "w") as f:
    f.write(str(os.getpid()))
dist.init_process_group("gloo")
for step in range(1000):
    if rank == 1 and step == 2:
        with open(os.path.join(out, "failed_at"), "w") as f:
            f.write(repr(time.time()))
        if how == "exit3":
            os._exit(3)
        os.kill(os.getpid(), signal.SIGKILL)
    t = torch.ones(1)
    dist.all_reduce(t)
    time.sleep(0.2)
