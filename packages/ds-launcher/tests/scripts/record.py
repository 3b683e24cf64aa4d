"""A rank that records, byte for byte, its argv and environment (no torch: fast)."""

import json
import os
import sys

out = sys.argv[1]
rank = os.environ["RANK"]
with open(os.path.join(out, f"pid_{rank}"), "w") as f:
    f.write(str(os.getpid()))
record = {
    "argv": [os.fsencode(a).hex() for a in sys.argv[2:]],
    "env": {k.decode(): v.hex() for k, v in os.environb.items()},
    "cwd": os.getcwd(),
    "affinity": sorted(os.sched_getaffinity(0)),
}
with open(os.path.join(out, f"rank_{rank}.json"), "w") as f:
    json.dump(record, f)
print(f"recorded rank {rank}")
