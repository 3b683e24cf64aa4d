"""MPI for real: Debian's openmpi-bin mpirun starts 2 ranks; see scripts/mpi_compressed_parity.py.

Needs the apt packages openmpi-bin and libopenmpi-dev and the pip package mpi4py (the `mpi`
extra). Skips when they are missing, except under DS_REQUIRE_SYSTEM_TOOLS=1.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "mpi_compressed_parity.py"


def _require(ok: bool, reason: str) -> None:
    if ok:
        return
    if os.environ.get("DS_REQUIRE_SYSTEM_TOOLS") == "1":
        pytest.fail(f"{reason} (DS_REQUIRE_SYSTEM_TOOLS=1)")
    pytest.skip(reason)


def test_mpirun_discovery_and_backend_parity():
    mpirun = shutil.which("mpirun")
    _require(mpirun is not None, "mpirun not found: apt-get install openmpi-bin libopenmpi-dev")
    _require(
        importlib.util.find_spec("mpi4py") is not None,
        "mpi4py not installed: pip install 'ds-comm[mpi]'",
    )
    env = {
        **os.environ,
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
    }
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # discovery must come from MPI, not from a leftover torchrun variable
    cmd = [
        mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2",
        "-x", "GLOO_SOCKET_IFNAME", "-x", "OMP_NUM_THREADS",
        sys.executable, str(SCRIPT),
    ]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("MPI-PARITY-OK") == 2, p.stdout + p.stderr
