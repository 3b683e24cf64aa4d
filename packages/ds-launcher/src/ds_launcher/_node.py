"""Turn a NodePlan into the rank processes of one node."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ds_launcher._devices import available_cores, core_pool, split_cores, visible_value
from ds_launcher._plan import NodePlan, rank_env
from ds_launcher._supervisor import Member, StdinMode
from ds_launcher._watchdog import HEARTBEAT_ENV

# Runs as `python -c _BIND_TRAMPOLINE <cores> <argv...>`: pins itself, then becomes the rank, so
# the rank is bound before it starts any thread (Popen's preexec_fn is unsafe with our threads).
_BIND_TRAMPOLINE = (
    "import os, sys; "
    "os.sched_setaffinity(0, [int(c) for c in sys.argv[1].split(',')]); "
    "os.execvp(sys.argv[2], sys.argv[2:])"
)


def core_shares(plan: NodePlan, local_world_size: int) -> list[tuple[int, ...]] | None:
    """Each local rank's cores under --bind_cores_to_rank, else None."""
    if not plan.bind_cores_to_rank:
        return None
    # Resolved on the node that runs the ranks: core ids and topology are per machine.
    pool = core_pool(plan.bind_core_list, available_cores())
    return split_cores(pool, local_world_size)


@contextmanager
def heartbeat_dir(plan: NodePlan) -> Iterator[str | None]:
    """A private directory for this node's heartbeat files while its ranks run (None without
    --rank_timeout). Local, not the log dir: beats must not go through a shared filesystem."""
    if plan.rank_timeout is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="ds-launch-heartbeat-") as path:
        yield path


def rank_member(
    plan: NodePlan,
    env: dict[str, str],
    cores: tuple[int, ...] | None,
    stdin: StdinMode,
    host: str | None = None,
    heartbeat_dir: str | None = None,
) -> Member:
    """The process of one rank; `env` already holds its RANK and the rest of the contract."""
    argv = plan.program.argv()
    if cores is not None:
        env.setdefault("OMP_NUM_THREADS", str(len(cores)))
        argv = [plan.program.python, "-c", _BIND_TRAMPOLINE, ",".join(map(str, cores)), *argv]
    rank = int(env["RANK"])
    beat = Path(heartbeat_dir) / f"rank_{rank}" if heartbeat_dir is not None else None
    if beat is not None:
        env[HEARTBEAT_ENV] = str(beat)
    return Member(
        name=f"rank {rank}",
        argv=argv,
        env=env,
        prefix=f"[rank {rank}] ".encode(),
        log_path=Path(plan.log_dir) / f"rank_{rank}.log" if plan.log_dir else None,
        stdin=stdin,
        host=host,
        heartbeat=beat,
    )


def rank_members(
    plan: NodePlan,
    node_rank: int,
    base_env: dict[str, str],
    parent_visible: tuple[str, ...] | None = None,
    stdin: StdinMode = StdinMode.INHERIT,
    heartbeat_dir: str | None = None,
) -> list[Member]:
    """One Member per slot of node `node_rank`, with the rank environment and device assignment.

    `base_env` is the environment every rank starts from (the launcher's or agent's environment
    plus the exported variables); the rank variables are laid over it.
    """
    slots = plan.world.slots(node_rank)
    shares = core_shares(plan, len(slots))
    members: list[Member] = []
    for local_rank in range(len(slots)):
        env = dict(base_env)
        env.update(rank_env(plan, node_rank, local_rank))
        if plan.visible_var is not None:
            # All of the node's devices stay visible to each rank (LOCAL_RANK picks one), as in
            # DeepSpeed and torchrun, so ranks can still reach their peers' devices (P2P/IPC).
            env[plan.visible_var] = visible_value(slots, parent_visible)
        cores = shares[local_rank] if shares is not None else None
        host = plan.world.hosts[node_rank]
        members.append(rank_member(plan, env, cores, stdin, host, heartbeat_dir))
    return members
