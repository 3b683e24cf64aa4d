"""Rank 0 fails (exit 1) on the first attempt only; every rank records each attempt's port."""

import os
import sys
import time

out = sys.argv[1]
rank = os.environ["RANK"]
with open(os.path.join(out, f"port_{rank}"), "a") as f:
    f.write(os.environ["MASTER_PORT"] + "\n")
marker = os.path.join(out, "failed_once")
if rank == "0":
    if not os.path.exists(marker):
        while not os.path.exists(os.path.join(out, "port_1")):  # rank 1 has started
            time.sleep(0.01)
        open(marker, "w").close()
        sys.exit(1)
elif not os.path.exists(marker):
    time.sleep(30)  # the failing attempt: the launcher must stop this rank, not wait for it
