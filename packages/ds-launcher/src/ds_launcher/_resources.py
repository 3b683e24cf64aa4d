"""Choosing which hosts and slots a run uses: --include/--exclude, --num_nodes, --num_gpus.

A *resource map* is an ordered {hostname: [slot ids]}; its order fixes the node ranks and the
global ranks (node 0's slots get ranks 0..n0-1, and so on).
"""

from __future__ import annotations

from ds_launcher._errors import HostfileError
from ds_launcher._hostfile import check_hostname

ResourceMap = dict[str, list[int]]


def slots_to_resources(hosts: dict[str, int]) -> ResourceMap:
    """A hostfile's {host: slots} as {host: [0, 1, ..., slots-1]}."""
    return {host: list(range(n)) for host, n in hosts.items()}


def _parse_slots(slot_text: str, where: str) -> list[int]:
    slots: list[int] = []
    for item in slot_text.split(","):
        item = item.strip()
        if item.startswith("-") and item[1:].isascii() and item[1:].isdigit():
            raise HostfileError(f"{where}: slot {item} is negative; slots count from 0")
        if not (item.isascii() and item.isdigit()):
            raise HostfileError(
                f"{where}: slot {item!r} is not a whole number; write slots as 'host:0,1,2'"
            )
        if int(item) in slots:
            # DeepSpeed drops the repeat, so `host:0,0` silently became one rank, not two.
            raise HostfileError(
                f"{where}: slot {int(item)} is listed twice; name each slot once "
                "(one rank runs per slot)"
            )
        slots.append(int(item))
    return slots


def parse_filter(spec: str, flag: str) -> dict[str, list[int] | None]:
    """Parse `worker-1:0,1@worker-2` into {host: [slots] or None (all slots)}.

    A host may appear in several entries with disjoint slots (`a:0@a:1`, as DeepSpeed allows),
    but nothing may be selected twice, and two spellings of one host (`a@A`: host names are
    case-insensitive) are an error naming both.
    """
    if not spec.strip():
        raise HostfileError(f"{flag} is empty; give hosts like 'worker-1:0,1@worker-2'")
    out: dict[str, list[int] | None] = {}
    spelling: dict[str, str] = {}  # lower-cased name -> the first spelling used
    for part in spec.split("@"):
        part = part.strip()
        where = f"{flag} {spec!r}, entry {part!r}"
        if not part:
            raise HostfileError(f"{where}: empty entry; separate hosts with a single '@'")
        host, sep, slot_text = part.partition(":")
        check_hostname(host, where)
        first = spelling.setdefault(host.lower(), host)
        if first != host:
            raise HostfileError(
                f"{where}: host {host!r} is also named as {first!r}; host names are "
                "case-insensitive, so both are the same machine: name it once"
            )
        if not sep:
            if host in out:
                raise HostfileError(
                    f"{where}: host {host!r} is named twice; name it once "
                    "(without slots for all of its slots)"
                )
            out[host] = None
            continue
        slots = _parse_slots(slot_text, where)
        previous = out.get(host, [])
        if previous is None:
            raise HostfileError(f"{where}: host {host!r} is named both with and without slots")
        twice = sorted(set(previous) & set(slots))
        if twice:
            raise HostfileError(
                f"{where}: slot(s) {twice} of host {host!r} are named twice; name each slot once"
            )
        out[host] = sorted(set(previous) | set(slots))
    return out


def _match_hosts(
    wanted: dict[str, list[int] | None], available: ResourceMap, flag: str, source: str
) -> dict[str, list[int] | None]:
    """`wanted` keyed by the spelling of `available` (names match case-insensitively, as DNS
    does), after checking that every host and slot it names exists."""
    by_lower = {host.lower(): host for host in available}
    matched: dict[str, list[int] | None] = {}
    for host, slots in wanted.items():
        if host.lower() not in by_lower:
            raise HostfileError(
                f"{flag} names host {host!r}, which is not in {source} "
                f"(hosts there: {', '.join(available) or 'none'})"
            )
        known = by_lower[host.lower()]
        for slot in slots or []:
            if slot not in available[known]:
                raise HostfileError(
                    f"{flag} names slot {slot} of host {host!r}, but {source} gives that host "
                    f"slots {available[known]}"
                )
        matched[known] = slots
    return matched


def select_resources(
    available: ResourceMap,
    include: str | None = None,
    exclude: str | None = None,
    num_nodes: int | None = None,
    num_gpus: int | None = None,
    source: str = "the hostfile",
) -> ResourceMap:
    """Apply DeepSpeed's selection flags to `available`; the result keeps hostfile order.

    --include keeps only what it names; --exclude drops what it names (a host with no slots
    left is dropped); --num_nodes keeps the first N hosts; --num_gpus the first N slots of each.
    """
    if include is not None and exclude is not None:
        raise HostfileError("--include and --exclude cannot be used together; use one of them")
    if (include is not None or exclude is not None) and (
        num_nodes is not None or num_gpus is not None
    ):
        raise HostfileError(
            "--num_nodes/--num_gpus cannot be combined with --include/--exclude; "
            "name the exact hosts and slots in --include instead"
        )
    chosen: ResourceMap = {host: list(slots) for host, slots in available.items()}
    if include is not None:
        wanted = _match_hosts(parse_filter(include, "--include"), available, "--include", source)
        chosen = {
            host: list(slots) if wanted[host] is None else list(wanted[host])  # type: ignore[arg-type]
            for host, slots in available.items()
            if host in wanted
        }
    elif exclude is not None:
        unwanted = _match_hosts(parse_filter(exclude, "--exclude"), available, "--exclude", source)
        chosen = {}
        for host, slots in available.items():
            drop = unwanted.get(host, [])
            kept = [] if drop is None else [s for s in slots if s not in drop]
            if kept:
                chosen[host] = kept
    if num_nodes is not None:
        if num_nodes < 1:
            raise HostfileError(f"--num_nodes must be at least 1, got {num_nodes}")
        if num_nodes > len(chosen):
            raise HostfileError(
                f"--num_nodes {num_nodes} asks for more hosts than {source} has ({len(chosen)})"
            )
        chosen = dict(list(chosen.items())[:num_nodes])
    if num_gpus is not None:
        if num_gpus < 1:
            raise HostfileError(f"--num_gpus must be at least 1, got {num_gpus}")
        short = [host for host, slots in chosen.items() if len(slots) < num_gpus]
        if short:
            raise HostfileError(
                f"--num_gpus {num_gpus} asks for more slots than {source} gives host(s) "
                f"{', '.join(short)}"
            )
        chosen = {host: slots[:num_gpus] for host, slots in chosen.items()}
    if not chosen:
        raise HostfileError(f"the selection leaves no hosts of {source} to run on")
    return chosen
