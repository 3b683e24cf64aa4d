"""Run ``python <script> args...`` and record its real exit status in
``$FAULT_EXIT_DIR/rank<RANK>.<MASTER_PORT>``, then exit with it.

ds-launch does not report the exit status of ranks it stopped (a SIGTERM to the launcher ends
the job with 128+15 whatever the ranks did); this probe lets a test check that every rank saved
and exited 0. The launcher signals the whole process group, so the child gets the SIGTERM
directly; the probe itself ignores it and waits (its SIGKILL, after the grace, still works).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: None)  # not SIG_IGN: the child must not inherit it
    code = subprocess.call([sys.executable, *sys.argv[1:]])
    out = os.environ["FAULT_EXIT_DIR"]
    os.makedirs(out, exist_ok=True)
    name = f"rank{os.environ.get('RANK', '0')}.{os.environ.get('MASTER_PORT', '0')}"
    with open(os.path.join(out, name), "w") as f:
        f.write(str(code))
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
