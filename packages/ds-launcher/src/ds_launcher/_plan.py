"""What to run where: the world (hosts and slots in rank order), the program every rank runs, and
the per-node settings. A NodePlan is everything a per-node agent needs, and it travels to remote
hosts as an argv (see `_agent.py`), so a flag given to ds-launch cannot be dropped on the way.
"""

from __future__ import annotations

import base64
import json
import sys
from dataclasses import dataclass, field

from ds_launcher._errors import LauncherError
from ds_launcher._hostfile import check_hostname


@dataclass(frozen=True)
class World:
    """Hosts in node-rank order, each with the slot ids (device indices) it runs ranks on."""

    nodes: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def from_resources(cls, resources: dict[str, list[int]]) -> World:
        return cls(tuple((host, tuple(slots)) for host, slots in resources.items()))

    @property
    def hosts(self) -> list[str]:
        return [host for host, _ in self.nodes]

    @property
    def size(self) -> int:
        return sum(len(slots) for _, slots in self.nodes)

    def first_rank(self, node_rank: int) -> int:
        return sum(len(slots) for _, slots in self.nodes[:node_rank])

    def slots(self, node_rank: int) -> tuple[int, ...]:
        return self.nodes[node_rank][1]

    def node_rank_of(self, host: str) -> int:
        for i, (name, _) in enumerate(self.nodes):
            if name == host:
                return i
        raise LauncherError(f"host {host!r} is not part of this run ({', '.join(self.hosts)})")

    def encode(self) -> str:
        """URL-safe base64 of a JSON list: shell-inert, so it needs no quoting to survive."""
        payload = json.dumps([[h, list(s)] for h, s in self.nodes], separators=(",", ":"))
        return base64.urlsafe_b64encode(payload.encode()).decode()

    @classmethod
    def decode(cls, text: str) -> World:
        try:
            raw = json.loads(base64.urlsafe_b64decode(text.encode()))
            nodes = tuple((str(h), tuple(int(s) for s in slots)) for h, slots in raw)
        except (ValueError, TypeError) as exc:
            raise LauncherError(f"--world_info is not a world description: {exc}") from None
        for host, _ in nodes:
            check_hostname(host, "--world_info")
        return cls(nodes)


@dataclass(frozen=True)
class Program:
    """The command every rank runs."""

    script: str
    args: tuple[str, ...] = ()
    module: bool = False
    no_python: bool = False
    python: str = field(default_factory=lambda: sys.executable)

    def argv(self) -> list[str]:
        if self.no_python:
            return [self.script, *self.args]
        if self.module:
            return [self.python, "-u", "-m", self.script, *self.args]
        return [self.python, "-u", self.script, *self.args]


@dataclass(frozen=True)
class NodePlan:
    """Everything needed to start the ranks of any one node."""

    world: World
    master_addr: str
    master_port: int
    program: Program
    visible_var: str | None = None
    log_dir: str | None = None
    bind_cores_to_rank: bool = False
    bind_core_list: str | None = None
    term_timeout: float = 5.0
    rank_timeout: float | None = None  # the watchdog's limit (see _watchdog); None: no watchdog


def rank_env(plan: NodePlan, node_rank: int, local_rank: int) -> dict[str, str]:
    """The torch.distributed env:// contract, plus the node's identity."""
    slots = plan.world.slots(node_rank)
    return {
        "RANK": str(plan.world.first_rank(node_rank) + local_rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(plan.world.size),
        "LOCAL_WORLD_SIZE": str(len(slots)),
        "NODE_RANK": str(node_rank),
        "GROUP_RANK": str(node_rank),
        "NNODES": str(len(plan.world.nodes)),
        "MASTER_ADDR": plan.master_addr,
        "MASTER_PORT": str(plan.master_port),
    }
