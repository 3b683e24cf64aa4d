"""Ranks that sleep until told to stop; a SIGTERM is recorded before exiting."""

import os
import signal
import sys
import time

out = sys.argv[1]
rank = os.environ["RANK"]


def on_term(signum, frame):
    with open(os.path.join(out, f"term_{rank}"), "w") as f:
        f.write(signal.Signals(signum).name)
    sys.exit(143)


signal.signal(signal.SIGTERM, on_term)
with open(os.path.join(out, f"pid_{rank}"), "w") as f:
    f.write(str(os.getpid()))
time.sleep(120)
