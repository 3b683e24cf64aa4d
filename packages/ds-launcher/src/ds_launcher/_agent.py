"""The per-node agent: `python -m ds_launcher._agent_main [options] -- script args`.

ssh and pdsh runners start one agent per host; it starts that node's ranks under the fail-fast
supervisor and exits with the group's code. It stops its ranks when it gets SIGTERM/SIGINT/SIGHUP,
when its stdin reaches EOF (--watch_stdin: the ssh runner closes it to stop a node, and it also
closes when the connection drops), and when its parent exits (the sshd session went away).

With --from_mpi_env it instead runs the one rank that mpirun/srun started it as, translating
OMPI_COMM_WORLD_*/PMI_*/SLURM_* into the RANK/LOCAL_RANK/WORLD_SIZE contract.

The argv is produced by `agent_argv` and read by `parse_agent_argv`, one definition for both, so
a NodePlan survives the trip unchanged (checked by a round-trip test).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

from ds_launcher._errors import LauncherError
from ds_launcher._plan import NodePlan, Program, World
from ds_launcher._supervisor import Member, StdinMode, StopRequest, run_group

AGENT_MODULE = "ds_launcher._agent_main"


@dataclass(frozen=True)
class AgentCall:
    plan: NodePlan
    node_rank: int | None = None  # None: look the node up by node_host
    node_host: str | None = None
    watch_stdin: bool = False
    from_mpi_env: bool = False


def agent_argv(call: AgentCall) -> list[str]:
    plan = call.plan
    argv = [plan.program.python, "-u", "-m", AGENT_MODULE]
    argv += ["--world_info", plan.world.encode()]
    argv += ["--master_addr", plan.master_addr, "--master_port", str(plan.master_port)]
    argv += ["--term_timeout", repr(plan.term_timeout)]
    if plan.rank_timeout is not None:
        argv += ["--rank_timeout", repr(plan.rank_timeout)]
    if call.node_rank is not None:
        argv += ["--node_rank", str(call.node_rank)]
    if call.node_host is not None:
        argv += ["--node_host", call.node_host]
    if plan.visible_var is not None:
        argv += ["--visible_var", plan.visible_var]
    if plan.log_dir is not None:
        argv += ["--log_dir", plan.log_dir]
    if plan.bind_cores_to_rank:
        argv += ["--bind_cores_to_rank"]
    if plan.bind_core_list is not None:
        argv += ["--bind_core_list", plan.bind_core_list]
    if plan.program.module:
        argv += ["--module"]
    if plan.program.no_python:
        argv += ["--no_python"]
    if call.watch_stdin:
        argv += ["--watch_stdin"]
    if call.from_mpi_env:
        argv += ["--from_mpi_env"]
    return [*argv, "--", plan.program.script, *plan.program.args]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ds_launcher._agent_main", allow_abbrev=False)
    p.add_argument("--world_info", required=True)
    p.add_argument("--master_addr", required=True)
    p.add_argument("--master_port", type=int, required=True)
    p.add_argument("--term_timeout", type=float, default=5.0)
    p.add_argument("--rank_timeout", type=float)
    p.add_argument("--node_rank", type=int)
    p.add_argument("--node_host")
    p.add_argument("--visible_var")
    p.add_argument("--log_dir")
    p.add_argument("--bind_cores_to_rank", action="store_true")
    p.add_argument("--bind_core_list")
    p.add_argument("--module", action="store_true")
    p.add_argument("--no_python", action="store_true")
    p.add_argument("--watch_stdin", action="store_true")
    p.add_argument("--from_mpi_env", action="store_true")
    return p


def parse_agent_argv(argv: list[str], python: str | None = None) -> AgentCall:
    """Inverse of agent_argv(...)[4:] (the options after `python -u -m module`)."""
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        raise LauncherError("agent: expected '-- script [args...]' after the options")
    cut = argv.index("--")
    ns = _parser().parse_args(argv[:cut])
    program = Program(
        script=argv[cut + 1],
        args=tuple(argv[cut + 2 :]),
        module=ns.module,
        no_python=ns.no_python,
        python=python or sys.executable,
    )
    plan = NodePlan(
        world=World.decode(ns.world_info),
        master_addr=ns.master_addr,
        master_port=ns.master_port,
        program=program,
        visible_var=ns.visible_var,
        log_dir=ns.log_dir,
        bind_cores_to_rank=ns.bind_cores_to_rank,
        bind_core_list=ns.bind_core_list,
        term_timeout=ns.term_timeout,
        rank_timeout=ns.rank_timeout,
    )
    return AgentCall(
        plan=plan,
        node_rank=ns.node_rank,
        node_host=ns.node_host,
        watch_stdin=ns.watch_stdin,
        from_mpi_env=ns.from_mpi_env,
    )


def _first(environ: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    for name in names:
        if environ.get(name, "").strip():
            return environ[name].strip()
    return None


def mpi_rank_env(environ: Mapping[str, str], world: World) -> dict[str, str]:
    """RANK/LOCAL_RANK/WORLD_SIZE/LOCAL_WORLD_SIZE from OpenMPI, MPICH (hydra/PMI) or SLURM."""
    rank = _first(environ, ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"))
    size = _first(environ, ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"))
    local = _first(environ, ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"))
    local_size = _first(
        environ, ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE")
    )
    if rank is None or size is None or local is None:
        raise LauncherError(
            "agent --from_mpi_env: no MPI/SLURM rank variables (OMPI_COMM_WORLD_RANK, PMI_RANK, "
            "SLURM_PROCID, ...) in the environment; start it through mpirun, mpiexec or srun"
        )
    if int(size) != world.size:
        raise LauncherError(
            f"agent --from_mpi_env: the MPI world has {size} processes but the hostfile "
            f"selection has {world.size} slots; do not pass -n/-np in --launcher_args"
        )
    if local_size is None:
        # Every runner that needs this fallback (slurm) gives all nodes the same slot count.
        local_size = str(len(world.slots(0)))
    return {
        "RANK": rank,
        "LOCAL_RANK": local,
        "WORLD_SIZE": size,
        "LOCAL_WORLD_SIZE": local_size,
    }


def _watch_stdin(stop: StopRequest) -> None:
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    stop.request("the launcher closed the connection")


def _watch_parent(stop: StopRequest, parent: int) -> None:
    while not stop.is_set():
        if os.getppid() != parent:
            stop.request("the launcher's connection went away (parent process exited)")
            return
        time.sleep(0.5)


def _install_signal_handlers(stop: StopRequest) -> None:
    def handler(signum: int, _frame: object) -> None:
        stop.request(f"received {signal.Signals(signum).name}", signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, handler)


def run_agent(call: AgentCall) -> int:
    from ds_launcher._node import heartbeat_dir, rank_members

    plan = call.plan
    stop = StopRequest()
    _install_signal_handlers(stop)
    threading.Thread(target=_watch_parent, args=(stop, os.getppid()), daemon=True).start()
    if call.watch_stdin:
        threading.Thread(target=_watch_stdin, args=(stop,), daemon=True).start()
    env = dict(os.environ)
    parent_visible = None
    if plan.visible_var and env.get(plan.visible_var, "").strip():
        parent_visible = tuple(v.strip() for v in env[plan.visible_var].split(","))
    with heartbeat_dir(plan) as beats:
        if call.from_mpi_env:
            members = [_mpi_member(plan, env, beats)]
        else:
            node_rank = call.node_rank
            if node_rank is None:
                if call.node_host is None:
                    raise LauncherError("agent: give --node_rank or --node_host")
                node_rank = plan.world.node_rank_of(call.node_host)
            if not 0 <= node_rank < len(plan.world.nodes):
                raise LauncherError(
                    f"agent: --node_rank {node_rank} is outside 0..{len(plan.world.nodes) - 1}"
                )
            members = rank_members(plan, node_rank, env, parent_visible, StdinMode.DEVNULL, beats)
        result = run_group(
            members, term_timeout=plan.term_timeout, rank_timeout=plan.rank_timeout, stop=stop
        )
    return result.exit_code


def _mpi_member(plan: NodePlan, env: dict[str, str], beats: str | None) -> Member:
    from ds_launcher._node import core_shares, rank_member

    ids = mpi_rank_env(env, plan.world)
    env = dict(env)
    env.update(ids)
    env["MASTER_ADDR"], env["MASTER_PORT"] = plan.master_addr, str(plan.master_port)
    env["NNODES"] = str(len(plan.world.nodes))
    # mpirun/srun place ranks by slot, in hostfile order, so the node follows from the rank.
    node = _first(env, ("SLURM_NODEID",))
    if node is None:
        rank = int(ids["RANK"])
        node = str(
            next(
                i
                for i in range(len(plan.world.nodes))
                if rank < plan.world.first_rank(i) + len(plan.world.slots(i))
            )
        )
    env["NODE_RANK"] = env["GROUP_RANK"] = node
    shares = core_shares(plan, int(ids["LOCAL_WORLD_SIZE"]))
    cores = shares[int(ids["LOCAL_RANK"])] if shares is not None else None
    return rank_member(plan, env, cores, StdinMode.DEVNULL, plan.world.hosts[int(node)], beats)


def main(argv: list[str] | None = None) -> int:
    try:
        call = parse_agent_argv(sys.argv[1:] if argv is None else argv)
        return run_agent(call)
    except LauncherError as exc:
        print(f"ds-launch agent on {os.uname().nodename}: error: {exc}", file=sys.stderr)
        return 2
