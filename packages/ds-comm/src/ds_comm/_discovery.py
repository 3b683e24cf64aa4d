"""Where rank, world size, local rank and the rendezvous address come from.

Three sources, tried in this order:

1. torchrun / ds-launch: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
   ``MASTER_PORT`` (both launchers set the same five variables);
2. MPI (``mpirun``/``mpiexec`` of Open MPI, MPICH, Intel MPI, MVAPICH): rank and size from
   mpi4py, local rank from a shared-memory split of COMM_WORLD, rank 0's address and a free port
   broadcast to every rank;
3. SLURM (``srun``): ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID`` and the first host of
   ``SLURM_JOB_NODELIST``; ``MASTER_PORT`` if set, else 29500.

The environment-reading functions are pure (they take a mapping) so they are tested without
launching anything. A source whose variables are only partly present is an error naming the
missing ones: silently falling through to another source would rendezvous the wrong ranks.
"""

from __future__ import annotations

import enum
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SLURM_VARS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
SLURM_NODELIST_VARS = ("SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_STEP_NODELIST")
# Set by the MPI launchers on every rank; their presence means "we were started by mpirun".
MPI_MARKER_VARS = (
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
    "PMIX_RANK",
    "MV2_COMM_WORLD_SIZE",
    "MPI_LOCALNRANKS",
)
DEFAULT_PORT = 29500
# (world-size variable, rank variable, launcher) as each launcher exports them, first match wins
# (mpirun inside an srun allocation reports mpirun). Read without any rendezvous or MPI call to
# tell a lone process from one rank of several (``require_initialized_if_launched``). srun sets
# the step's task count; SLURM_NTASKS alone is also set in the batch script of `sbatch -n N`,
# where one python process meant as N ranks is the same mistake.
WORLD_SIZE_VARS = (
    ("WORLD_SIZE", "RANK", "torchrun/ds-launch"),
    ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "Open MPI's mpirun"),
    ("PMI_SIZE", "PMI_RANK", "mpirun (MPICH / Intel MPI, PMI)"),
    ("MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK", "MVAPICH's mpirun"),
    ("SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "srun (SLURM)"),
    ("SLURM_NTASKS", "SLURM_PROCID", "SLURM (srun/sbatch)"),
)


class DiscoveryError(RuntimeError):
    """The launcher environment is missing or inconsistent."""


class Source(enum.Enum):
    """Which launcher the rank layout was read from."""

    ENV = "env"  # torchrun or ds-launch variables
    MPI = "mpi"
    SLURM = "slurm"
    EXISTING = "existing"  # torch.distributed was already initialised by someone else


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: Source

    def as_environ(self) -> dict[str, str]:
        """The torchrun variables describing this layout (what ``env://`` reads)."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def _int(env: Mapping[str, str], key: str, source: str) -> int:
    raw = env[key]
    try:
        return int(raw)
    except ValueError:
        raise DiscoveryError(f"{source}: {key}={raw!r} is not an integer") from None


def _validate(rank: int, world: int, local_rank: int, port: int, source: str) -> None:
    if world < 1:
        raise DiscoveryError(f"{source}: world size {world} must be >= 1")
    if not 0 <= rank < world:
        raise DiscoveryError(f"{source}: rank {rank} is outside [0, {world})")
    if local_rank < 0:
        raise DiscoveryError(f"{source}: local rank {local_rank} must be >= 0")
    if not 0 < port < 65536:
        raise DiscoveryError(f"{source}: MASTER_PORT {port} is not a TCP port")


def from_torchrun_env(env: Mapping[str, str]) -> DistEnv | None:
    """The layout from torchrun/ds-launch variables; None when none of them is set."""
    # MASTER_ADDR/MASTER_PORT alone do not mean torchrun: SLURM and MPI jobs often export them.
    if not any(v in env for v in TORCHRUN_VARS[:3]):
        return None
    present = [v for v in TORCHRUN_VARS if v in env]
    missing = [v for v in TORCHRUN_VARS if v not in env]
    if missing:
        raise DiscoveryError(
            f"incomplete launcher environment: {', '.join(present)} set but "
            f"{', '.join(missing)} missing; torchrun and ds-launch set all of "
            f"{', '.join(TORCHRUN_VARS)} (for a single process: RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 "
            f"MASTER_ADDR=127.0.0.1 MASTER_PORT=29500)"
        )
    src = "torchrun/ds-launch environment"
    rank, world = _int(env, "RANK", src), _int(env, "WORLD_SIZE", src)
    local, port = _int(env, "LOCAL_RANK", src), _int(env, "MASTER_PORT", src)
    _validate(rank, world, local, port, src)
    return DistEnv(rank, world, local, env["MASTER_ADDR"], port, Source.ENV)


def launched_by_mpi(env: Mapping[str, str]) -> bool:
    return any(v in env for v in MPI_MARKER_VARS)


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM hostlist: ``"gpu[07-09,12],cpu1"`` -> ``"gpu07"``."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise DiscoveryError("SLURM node list is empty")
    # First top-level entry (commas inside brackets separate ranges, not hosts).
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            end = i
            break
    entry = nodelist[:end]
    out = []
    i = 0
    while i < len(entry):
        if entry[i] == "[":
            close = entry.find("]", i)
            if close < 0:
                raise DiscoveryError(f"SLURM node list {nodelist!r} has an unclosed '['")
            first_range = entry[i + 1 : close].split(",")[0]
            out.append(first_range.split("-")[0])  # keeps zero padding: "07-09" -> "07"
            i = close + 1
        else:
            out.append(entry[i])
            i += 1
    return "".join(out)


def from_slurm_env(env: Mapping[str, str]) -> DistEnv | None:
    """The layout from srun's variables; None when ``SLURM_PROCID`` is not set."""
    if "SLURM_PROCID" not in env:
        return None
    missing = [v for v in SLURM_VARS if v not in env]
    nodelist_var = next((v for v in SLURM_NODELIST_VARS if v in env), None)
    if nodelist_var is None and "MASTER_ADDR" not in env:
        missing.append("SLURM_JOB_NODELIST (or MASTER_ADDR)")
    if missing:
        raise DiscoveryError(
            f"incomplete SLURM environment: {', '.join(missing)} missing; launch the ranks with "
            f"`srun` (which sets {', '.join(SLURM_VARS)} and SLURM_JOB_NODELIST), not `sbatch` alone"
        )
    src = "SLURM environment"
    rank, world = _int(env, "SLURM_PROCID", src), _int(env, "SLURM_NTASKS", src)
    local = _int(env, "SLURM_LOCALID", src)
    port = _int(env, "MASTER_PORT", src) if "MASTER_PORT" in env else DEFAULT_PORT
    addr = env.get("MASTER_ADDR") or first_slurm_host(env[nodelist_var])  # type: ignore[index]
    _validate(rank, world, local, port, src)
    return DistEnv(rank, world, local, addr, port, Source.SLURM)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _host_address() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return socket.getfqdn()


def from_mpi(comm=None) -> DistEnv:
    """The layout from MPI through mpi4py: a collective call, every rank must make it."""
    try:
        from mpi4py import MPI
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise DiscoveryError(
            "launched by MPI but mpi4py is not importable; install it with "
            "`pip install 'ds-comm[mpi]'` (needs an MPI library, e.g. Debian's "
            "openmpi-bin and libopenmpi-dev), or pass auto_mpi_discovery=False and set the "
            f"torchrun variables yourself ({e})"
        ) from e
    comm = comm if comm is not None else MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_size = node.Get_rank(), node.Get_size()
    node.Free()
    single_host = comm.allreduce(local_size, op=MPI.MIN) == world
    if rank == 0:
        # One host: loopback avoids depending on the hostname resolving (containers).
        addr = "127.0.0.1" if single_host else _host_address()
        port = int(os.environ.get("MASTER_PORT", 0)) or _free_port()
        info = (addr, port)
    else:
        info = None
    addr, port = comm.bcast(info, root=0)
    return DistEnv(rank, world, local_rank, addr, port, Source.MPI)


def discover(env: Mapping[str, str] | None = None, auto_mpi_discovery: bool = True) -> DistEnv:
    """Find the rank layout of this process (see the module docstring for the order)."""
    env = os.environ if env is None else env
    found = from_torchrun_env(env)
    if found is not None:
        return found
    if auto_mpi_discovery and launched_by_mpi(env):
        return from_mpi()
    found = from_slurm_env(env)
    if found is not None:
        return found
    hint = " or mpirun" if auto_mpi_discovery else ""
    raise DiscoveryError(
        "no launcher environment found: none of "
        f"{', '.join(TORCHRUN_VARS)} (torchrun/ds-launch), MPI ({', '.join(MPI_MARKER_VARS[:3])}) "
        f"or SLURM ({', '.join(SLURM_VARS)}) is set; start the script with torchrun, ds-launch"
        f"{hint} or srun, or for one process set RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 "
        f"MASTER_ADDR=127.0.0.1 MASTER_PORT=29500"
    )
