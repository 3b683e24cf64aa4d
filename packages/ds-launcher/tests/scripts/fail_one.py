"""Rank 1 exits with code 3 after its peers are up; the others sleep until stopped."""

import os
import sys
import time

out = sys.argv[1]
rank = os.environ["RANK"]
with open(os.path.join(out, f"pid_{rank}"), "w") as f:
    f.write(str(os.getpid()))
if rank == "1":
    deadline = time.monotonic() + 30
    world = int(os.environ["WORLD_SIZE"])
    while len([p for p in os.listdir(out) if p.startswith("pid_")]) < world:
        if time.monotonic() > deadline:
            sys.exit(9)
        time.sleep(0.02)
    sys.exit(3)
time.sleep(120)
