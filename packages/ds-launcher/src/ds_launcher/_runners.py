"""Multi-node runners: what to execute on this machine so that every node of a NodePlan runs.

Every function here is pure: it returns argv lists (and environments), so the commands are
checked by unit tests without ssh, pdsh, MPI or SLURM. Remote command strings are built only by
`remote_command`, from argv lists with shlex.quote; nothing is ever wrapped in double quotes.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from ds_launcher._agent import AgentCall, agent_argv
from ds_launcher._errors import LauncherError
from ds_launcher._plan import NodePlan
from ds_launcher._supervisor import GracefulStop, Member, StdinMode

RUNNERS: tuple[str, ...] = ("local", "ssh", "pdsh", "openmpi", "mpich", "slurm")


@dataclass(frozen=True)
class RunnerInput:
    plan: NodePlan
    exports: dict[str, str]  # exported to every rank (env files, NCCL_*, PYTHON*, ...)
    environ: dict[str, str]  # the launcher's own environment
    cwd: str  # ranks start here on every node
    launcher_args: tuple[str, ...] = field(default=())  # appended to the runner's own options


def remote_command(argv: list[str], exports: dict[str, str], cwd: str) -> str:
    """A POSIX-shell command line that cds to `cwd` and execs `argv` with `exports` set.

    Each word is shlex.quote'd (single quotes), so `$(...)`, backticks, `$VAR`, quotes, spaces
    and newlines reach the program byte for byte; `exec` leaves no shell between sshd and it.
    """
    words = ["exec", "env", *(f"{k}={v}" for k, v in exports.items()), *argv]
    return f"cd {shlex.quote(cwd)} && " + " ".join(shlex.quote(w) for w in words)


def ssh_members(inp: RunnerInput) -> list[Member]:
    """One `ssh host <agent command>` per node; closing its stdin stops that node."""
    members = []
    for node_rank, host in enumerate(inp.plan.world.hosts):
        call = AgentCall(inp.plan, node_rank=node_rank, watch_stdin=True)
        command = remote_command(agent_argv(call), inp.exports, inp.cwd)
        members.append(
            Member(
                name=f"node {node_rank} ({host})",
                # `--` ends ssh's options: nothing after it can be read as one.
                argv=["ssh", *inp.launcher_args, "--", host, command],
                env=dict(inp.environ),
                stdin=StdinMode.PIPE,
                graceful=GracefulStop.CLOSE_STDIN,
            )
        )
    return members


def pdsh_members(inp: RunnerInput) -> list[Member]:
    """One `pdsh -S -w host <agent command>` per node, so that one failing node stops the
    others (a single pdsh over all hosts would only return when every host is done).

    -S makes pdsh exit with the remote exit code (without it pdsh returns 0 on failure).
    pdsh substitutes %h/%u/%n in the command, so every literal '%' is doubled. Stopping a node
    kills pdsh and its ssh; the agent then sees its parent go and stops its ranks.
    """
    env = dict(inp.environ)
    env.setdefault("PDSH_RCMD_TYPE", "ssh")
    members = []
    for node_rank, host in enumerate(inp.plan.world.hosts):
        call = AgentCall(inp.plan, node_rank=node_rank)
        command = remote_command(agent_argv(call), inp.exports, inp.cwd).replace("%", "%%")
        members.append(
            Member(
                name=f"node {node_rank} ({host})",
                argv=["pdsh", "-S", "-w", host, *inp.launcher_args, command],
                env=env,
                stdin=StdinMode.DEVNULL,
            )
        )
    return members


def _check_whole_hosts(inp: RunnerInput, runner: str) -> None:
    for host, slots in inp.plan.world.nodes:
        if list(slots) != list(range(len(slots))):
            raise LauncherError(
                f"--launcher {runner} places ranks by count per host and cannot use the chosen "
                f"slots {list(slots)} of {host!r}; select whole hosts (or the first N slots "
                "with --num_gpus), or use --launcher ssh/pdsh for per-slot --include/--exclude"
            )


def _mpi_env(inp: RunnerInput) -> dict[str, str]:
    env = dict(inp.environ)
    env.update(inp.exports)
    env["MASTER_ADDR"] = inp.plan.master_addr
    env["MASTER_PORT"] = str(inp.plan.master_port)
    return env


def _rank_command(inp: RunnerInput) -> list[str]:
    return agent_argv(AgentCall(inp.plan, from_mpi_env=True))


def openmpi_command(inp: RunnerInput) -> tuple[list[str], dict[str, str]]:
    """OpenMPI's mpirun. Values are exported with `-x NAME` from mpirun's own environment,
    never spelled on its command line, so no value is ever re-parsed."""
    _check_whole_hosts(inp, "openmpi")
    world = inp.plan.world
    hosts = ",".join(f"{host}:{len(slots)}" for host, slots in world.nodes)
    argv = ["mpirun", "-n", str(world.size), "--host", hosts]
    if "--bind-to" not in inp.launcher_args:
        # mpirun binds each rank to one core by default; ds-launch binds only when asked
        # (--bind_cores_to_rank), as the other runners do.
        argv += ["--bind-to", "none"]
    argv += list(inp.launcher_args)
    for name in ("MASTER_ADDR", "MASTER_PORT", *inp.exports):
        argv += ["-x", name]
    return [*argv, *_rank_command(inp)], _mpi_env(inp)


def mpich_command(inp: RunnerInput, machinefile: str) -> tuple[list[str], dict[str, str], str]:
    """MPICH's hydra mpiexec with a machinefile of `host:N` lines (returned as the third item,
    for the caller to write to `machinefile`). hydra passes its whole environment (-genvall)."""
    _check_whole_hosts(inp, "mpich")
    world = inp.plan.world
    text = "".join(f"{host}:{len(slots)}\n" for host, slots in world.nodes)
    argv = ["mpiexec", "-n", str(world.size), "-f", machinefile, "-genvall"]
    return [*argv, *inp.launcher_args, *_rank_command(inp)], _mpi_env(inp), text


def slurm_command(inp: RunnerInput) -> tuple[list[str], dict[str, str]]:
    """srun inside an allocation. Values travel in srun's environment (--export=ALL), because
    srun's --export=VAR=value list is comma-separated and would split values with commas."""
    _check_whole_hosts(inp, "slurm")
    world = inp.plan.world
    per_node = {len(slots) for _, slots in world.nodes}
    if len(per_node) != 1:
        raise LauncherError(
            "--launcher slurm needs the same number of slots on every host; got "
            + ", ".join(f"{h}={len(s)}" for h, s in world.nodes)
        )
    argv = [
        "srun",
        f"--nodes={len(world.nodes)}",
        f"--ntasks={world.size}",
        f"--ntasks-per-node={per_node.pop()}",
        f"--nodelist={','.join(world.hosts)}",
        "--distribution=block",
        "--export=ALL",
        *inp.launcher_args,
    ]
    return [*argv, *_rank_command(inp)], _mpi_env(inp)
