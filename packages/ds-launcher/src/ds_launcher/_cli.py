"""`ds-launch [launcher options] script.py [script args]` (also `python -m ds_launcher`)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from ds_launcher._autotuning import run_autotuning
from ds_launcher._devices import Accelerator, detect_accelerator, parse_core_list
from ds_launcher._envfile import collect_exports, default_env_files
from ds_launcher._errors import LauncherError
from ds_launcher._hostfile import read_hostfile
from ds_launcher._node import heartbeat_dir, rank_members
from ds_launcher._options import DEFAULT_HOSTFILE, DEFAULT_MULTINODE_PORT, options
from ds_launcher._options import build_parser as _build_parser
from ds_launcher._options import split_argv as _split_argv
from ds_launcher._plan import NodePlan, Program, World
from ds_launcher._resources import select_resources, slots_to_resources
from ds_launcher._runners import (
    RUNNERS,
    RunnerInput,
    mpich_command,
    openmpi_command,
    pdsh_members,
    slurm_command,
    ssh_members,
)
from ds_launcher._supervisor import GroupResult, Member, Outcome, StdinMode, StopRequest, run_group
from ds_launcher._version import __version__

_TABLE = options(__version__, RUNNERS)


def build_parser() -> argparse.ArgumentParser:
    return _build_parser(_TABLE)


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(launcher options, [script, *script args]); see `_options.split_argv`."""
    return _split_argv(argv, _TABLE)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_this_machine(host: str) -> bool:
    names = {"localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()}
    names.add(socket.gethostname().split(".")[0])
    return host.lower() in {name.lower() for name in names}  # DNS names are case-insensitive


@dataclass(frozen=True)
class _Resolved:
    plan: NodePlan
    accel: Accelerator
    runner: str  # "local" (also for --no_ssh) or a multi-node runner
    node_rank: int  # the node started here for local/--no_ssh
    exports: dict[str, str]
    explicit_port: bool


def resolve(ns: argparse.Namespace, program: list[str], environ: dict[str, str]) -> _Resolved:
    accel = detect_accelerator(environ)
    hostfile = ns.hostfile
    if hostfile is None and Path(DEFAULT_HOSTFILE).is_file():
        hostfile = DEFAULT_HOSTFILE
    if hostfile is not None:
        available = slots_to_resources(read_hostfile(hostfile))
        source = f"hostfile {hostfile!r}"
    else:
        if accel.count is None:  # cpu, or an accelerator we cannot count: --num_gpus decides
            count = ns.num_gpus or 1
        elif accel.count == 0:
            raise LauncherError(
                f"no {accel.name} devices found on this machine; set DS_ACCELERATOR=cpu to run "
                "CPU processes, or pass -H/--hostfile"
            )
        else:
            count = accel.count
        available = {"localhost": list(range(count))}
        source = "this machine (no hostfile)"
    resources = select_resources(
        available, ns.include, ns.exclude, ns.num_nodes, ns.num_gpus, source=source
    )
    world = World.from_resources(resources)
    if ns.no_ssh:
        runner = "local"
        if ns.node_rank is None:
            raise LauncherError("--no_ssh needs --node_rank (this node's index in the hostfile)")
        if not 0 <= ns.node_rank < len(world.nodes):
            raise LauncherError(
                f"--node_rank {ns.node_rank} is outside 0..{len(world.nodes) - 1} "
                f"(the selection has {len(world.nodes)} hosts)"
            )
        node_rank = ns.node_rank
    else:
        if ns.node_rank is not None:
            raise LauncherError("--node_rank is only used with --no_ssh")
        single_local = len(world.nodes) == 1 and (
            hostfile is None or is_this_machine(world.hosts[0])
        )
        runner = ns.launcher or ("local" if single_local and not ns.force_multi else "ssh")
        if runner == "local" and len(world.nodes) > 1:
            raise LauncherError(
                f"--launcher local runs on this machine only, but the selection has "
                f"{len(world.nodes)} hosts ({', '.join(world.hosts)}); choose ssh, pdsh, "
                "openmpi, mpich or slurm, or select one host"
            )
        node_rank = 0
    if ns.bind_core_list is not None:
        parse_core_list(ns.bind_core_list)  # syntax errors here, not once per node
    on_one_machine = runner == "local" and not ns.no_ssh
    master_addr = ns.master_addr or ("127.0.0.1" if on_one_machine else world.hosts[0])
    if ns.master_port is not None:
        master_port = ns.master_port
    else:
        # DeepSpeed defaults to 29500 everywhere. On one machine a free port is used instead:
        # two jobs on one host would otherwise share 29500, and the second job's ranks can join
        # the first job's TCPStore before its own rank 0 fails to bind.
        master_port = free_port() if on_one_machine else DEFAULT_MULTINODE_PORT
    if not program:
        raise LauncherError("missing the script to run: ds-launch [options] script.py [args]")
    env_files = default_env_files() + [Path(p) for p in ns.env_file]
    extra = (accel.visible_var,) if accel.visible_var else ()
    exports = collect_exports(environ, env_files, extra)
    plan = NodePlan(
        world=world,
        master_addr=master_addr,
        master_port=master_port,
        program=Program(program[0], tuple(program[1:]), ns.module, ns.no_python),
        visible_var=accel.visible_var,
        log_dir=os.path.abspath(ns.log_dir) if ns.log_dir else None,
        bind_cores_to_rank=ns.bind_cores_to_rank or ns.bind_core_list is not None,
        bind_core_list=ns.bind_core_list,
        term_timeout=ns.term_timeout,
        rank_timeout=ns.rank_timeout,
    )
    if ns.module and ns.no_python:
        raise LauncherError("--module and --no_python cannot be used together")
    if runner == "local" and ns.launcher_args.strip():
        raise LauncherError(
            "--launcher_args is for the ssh, pdsh, openmpi, mpich and slurm runners; "
            "this run uses the local runner, which has no command to pass them to"
        )
    return _Resolved(plan, accel, runner, node_rank, exports, ns.master_port is not None)


_INSTALL_HINT = {
    "ssh": "install an OpenSSH client (Debian: openssh-client)",
    "pdsh": "install pdsh (Debian: pdsh)",
    "mpirun": "install OpenMPI (Debian: openmpi-bin)",
    "mpiexec": "install MPICH (Debian: mpich)",
    "srun": "run inside a SLURM allocation where srun is on PATH",
}


def _require_tool(name: str) -> None:
    if shutil.which(name) is None:
        raise LauncherError(f"{name!r} is not on PATH; {_INSTALL_HINT[name]}")


@contextmanager
def _signals_stop(stop: StopRequest) -> Iterator[None]:
    """SIGINT/SIGTERM/SIGHUP to the launcher stop the group (ranks run in their own sessions,
    so a Ctrl-C reaches them only this way, once, in order)."""

    def handler(signum: int, _frame: object) -> None:
        stop.request(f"received {signal.Signals(signum).name}", signum)

    if threading.current_thread() is not threading.main_thread():
        # main(argv) called from a worker thread: Python allows handlers only in the main thread.
        yield
        return
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, handler) for sig in sigs}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _run_once(r: _Resolved, launcher_args: tuple[str, ...], stop: StopRequest) -> GroupResult:
    plan = r.plan
    if r.runner == "local":
        base_env = dict(os.environ)
        base_env.update(r.exports)
        with heartbeat_dir(plan) as beats:
            members = rank_members(
                plan, r.node_rank, base_env, r.accel.parent_visible, heartbeat_dir=beats
            )
            return run_group(
                members, term_timeout=plan.term_timeout, rank_timeout=plan.rank_timeout, stop=stop
            )
    inp = RunnerInput(plan, r.exports, dict(os.environ), os.getcwd(), launcher_args)
    if r.runner in ("ssh", "pdsh"):
        _require_tool(r.runner)
        members = ssh_members(inp) if r.runner == "ssh" else pdsh_members(inp)
        # Each node's agent judges its own ranks (and names the hung one). Across nodes, only
        # exits are visible here: a node still running well after another finished is hung,
        # with its agent's own grace first so that the agent's message names the rank.
        if plan.rank_timeout is None:
            return run_group(members, term_timeout=plan.term_timeout, stop=stop)
        grace = plan.term_timeout + 5.0
        return run_group(
            members,
            term_timeout=plan.term_timeout,
            rank_timeout=plan.rank_timeout + grace,
            timeout_source=f"--rank_timeout {plan.rank_timeout:g} plus {grace:g} s for the "
            "node's own watchdog to report first",
            stop=stop,
        )
    with tempfile.TemporaryDirectory(prefix="ds-launch-") as tmp:
        if r.runner == "openmpi":
            _require_tool("mpirun")
            argv, env = openmpi_command(inp)
            stdin = StdinMode.INHERIT
        elif r.runner == "mpich":
            _require_tool("mpiexec")
            machinefile = os.path.join(tmp, "machinefile")
            argv, env, text = mpich_command(inp, machinefile)
            Path(machinefile).write_text(text)
            stdin = StdinMode.INHERIT
        else:
            _require_tool("srun")
            argv, env = slurm_command(inp)
            stdin = StdinMode.INHERIT
        member = Member(name=r.runner, argv=argv, env=env, stdin=stdin)
        # The runner forwards SIGTERM to its ranks itself; give it the agents' grace too.
        return run_group([member], term_timeout=plan.term_timeout + 5.0, stop=stop)


def first_address(output: str, host: str, runner: str) -> str | None:
    """The first IP address in `hostname -I` output (pdsh prefixes each line with 'host: ')."""
    for line in output.splitlines():
        if runner == "pdsh":
            line = line.removeprefix(f"{host}:")
        for word in line.split():
            try:
                return str(ipaddress.ip_address(word))
            except ValueError:
                continue
    return None


def infer_master_addr(r: _Resolved, launcher_args: tuple[str, ...]) -> str:
    """DeepSpeed's default MASTER_ADDR for multi-node runs: the first address that
    `hostname -I` prints on the first host. Hostfiles often name ssh aliases that only ssh can
    resolve; an address works for every rank. Without one, the hostfile's name is used."""
    host = r.plan.world.hosts[0]
    env = dict(os.environ)
    if r.runner == "ssh":
        argv = ["ssh", *launcher_args, "--", host, "hostname -I"]
    else:
        env.setdefault("PDSH_RCMD_TYPE", "ssh")
        argv = ["pdsh", "-S", "-w", host, *launcher_args, "hostname -I"]
    try:
        res = subprocess.run(
            argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        raise LauncherError(
            f"{r.runner} to {host!r} (to find MASTER_ADDR) did not answer within 60 s; "
            "check that the host is reachable, or pass --master_addr"
        ) from None
    if res.returncode != 0:
        raise LauncherError(
            f"{shlex.join(argv)!r} failed with code {res.returncode} while "
            f"looking up MASTER_ADDR on the first host {host!r}: {res.stderr.strip()[-500:]}; "
            "fix the connection, or pass --master_addr"
        )
    address = first_address(res.stdout, host, r.runner)
    if address is None:
        print(
            f"ds-launch: 'hostname -I' on {host!r} printed no address; using {host!r} as "
            "MASTER_ADDR (pass --master_addr to choose)",
            file=sys.stderr,
        )
        return host
    return address


def _describe(r: _Resolved) -> str:
    nodes = ", ".join(f"{h}:{len(s)}" for h, s in r.plan.world.nodes)
    where = f"node {r.node_rank} of " if r.runner == "local" and len(r.plan.world.nodes) > 1 else ""
    return (
        f"ds-launch: {r.plan.world.size} rank(s) on {where}{len(r.plan.world.nodes)} node(s) "
        f"[{nodes}] via {r.runner}, MASTER_ADDR={r.plan.master_addr} "
        f"MASTER_PORT={r.plan.master_port}"
    )


def launch(argv: list[str]) -> int:
    options, program = split_argv(argv)
    ns = build_parser().parse_args(options)
    r = resolve(ns, program, dict(os.environ))
    if ns.autotuning:
        return run_autotuning(ns.autotuning, r.plan.world.size, options, program)
    try:
        launcher_args = tuple(shlex.split(ns.launcher_args))
    except ValueError as exc:
        raise LauncherError(f"--launcher_args {ns.launcher_args!r}: {exc}") from None
    if ns.master_addr is None and r.runner in ("ssh", "pdsh"):
        _require_tool(r.runner)
        r = replace(r, plan=replace(r.plan, master_addr=infer_master_addr(r, launcher_args)))
    stop = StopRequest()
    with _signals_stop(stop):
        for attempt in range(ns.max_restarts + 1):
            if attempt:
                # A fresh port: the old rendezvous may still be in TIME_WAIT or held by a
                # straggler. Remote hosts cannot be probed, so multi-node runs count up.
                port = free_port() if r.runner == "local" and not ns.no_ssh else None
                r = replace(r, plan=replace(r.plan, master_port=port or r.plan.master_port + 1))
                print(f"ds-launch: restart {attempt} of {ns.max_restarts}", file=sys.stderr)
            print(_describe(r), file=sys.stderr, flush=True)
            result = _run_once(r, launcher_args, stop)
            if result.outcome not in (Outcome.MEMBER_FAILED, Outcome.HUNG):
                return result.exit_code
        return result.exit_code


def main(argv: list[str] | None = None) -> int:
    try:
        return launch(sys.argv[1:] if argv is None else list(argv))
    except LauncherError as exc:
        print(f"ds-launch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before any rank started (e.g. a hanging ssh lookup)
        return 128 + signal.SIGINT
