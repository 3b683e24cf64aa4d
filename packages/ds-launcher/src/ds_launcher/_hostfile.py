"""Hostfiles in DeepSpeed's format: `hostname slots=N` per line, `#` comments, blank lines.

Hostnames end up in ssh/pdsh/mpirun argv and in remote commands, so the accepted alphabet is
deliberately small: a name that starts with `-` would be read as an ssh option, and shell
metacharacters have no business in a hostname.
"""

from __future__ import annotations

import re
from pathlib import Path

from ds_launcher._errors import HostfileError

# Letters, digits, dot, underscore, dash; must start with a letter, digit or underscore.
# `:` and `@` are excluded because they are the separators of the --include/--exclude syntax.
_HOSTNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,252}")
_SLOTS = re.compile(r"slots=(\S*)")


def check_hostname(name: str, where: str) -> None:
    """Raise HostfileError unless `name` is safe to put in an ssh/pdsh/mpirun argv."""
    if name.startswith("-"):
        raise HostfileError(
            f"{where}: hostname {name!r} starts with '-', so ssh and pdsh would read it as an "
            "option; rename the host (or use its address)"
        )
    if not _HOSTNAME.fullmatch(name):
        bad = sorted({c for c in name if not (c.isascii() and (c.isalnum() or c in "._-"))})
        detail = f"characters {''.join(bad)!r} are not allowed" if bad else "it is not a hostname"
        raise HostfileError(
            f"{where}: hostname {name!r} is not usable ({detail}); hostnames may contain only "
            "letters, digits, '.', '_' and '-' and are at most 253 characters"
        )


def parse_hostfile(text: str, source: str = "<hostfile>") -> dict[str, int]:
    """Parse hostfile text into {hostname: slots}, in file order.

    `source` names the file in error messages. Raises HostfileError for anything that is not a
    comment, a blank line or `hostname slots=N` (an optional trailing `# comment` is allowed).
    """
    hosts: dict[str, int] = {}
    # Keyed by the lower-cased name: DNS names are case-insensitive, so `LOCALHOST` and
    # `localhost` are one machine and must not become two nodes with overlapping devices.
    first_seen: dict[str, tuple[str, int]] = {}
    # Lines end at '\n' only (and '\r\n'), so the line numbers in errors are the ones editors,
    # grep and `sed -n Np` show; str.splitlines would also break at \v, \f, \x1c-\x1e, \x85,
    # U+2028 and U+2029 and shift every later number.
    for lineno, raw in enumerate(text.split("\n"), start=1):
        raw = raw.removesuffix("\r")
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}:{lineno}: {raw.strip()!r}"
        fields = line.split()
        host = fields[0]
        check_hostname(host, where)
        if len(fields) == 1:
            raise HostfileError(
                f"{where}: missing slots; write '{host} slots=N' with N the number of "
                "accelerators (on CPU: processes) to use on that host"
            )
        if len(fields) > 2:
            raise HostfileError(
                f"{where}: unexpected text after the slots field; the format is 'hostname slots=N'"
            )
        match = _SLOTS.fullmatch(fields[1])
        if match is None:
            raise HostfileError(
                f"{where}: expected 'slots=N' after the hostname, got {fields[1]!r}"
            )
        value = match.group(1)
        if not (value.isascii() and value.isdigit()) or int(value) < 1 or len(value) > 6:
            raise HostfileError(
                f"{where}: slots must be a whole number from 1 to 999999, got {value!r} "
                "(remove the line to leave the host out)"
            )
        if host.lower() in first_seen:
            first, first_lineno = first_seen[host.lower()]
            spelling = "" if first == host else f" as {first!r}, host names are case-insensitive"
            raise HostfileError(
                f"{where}: host {host!r} is listed twice (first on line {first_lineno}{spelling}); "
                "list each host once with its total slots"
            )
        hosts[host] = int(value)
        first_seen[host.lower()] = (host, lineno)
    return hosts


def read_hostfile(path: str | Path) -> dict[str, int]:
    """Read and parse a hostfile; an unreadable or empty file is a HostfileError naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HostfileError(
            f"hostfile {str(path)!r} does not exist; pass an existing file to -H/--hostfile, "
            "or leave the flag out to run on this machine"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise HostfileError(f"hostfile {str(path)!r} cannot be read: {exc}") from None
    hosts = parse_hostfile(text, str(path))
    if not hosts:
        raise HostfileError(
            f"hostfile {str(path)!r} lists no hosts; add lines of the form 'hostname slots=N'"
        )
    return hosts


def format_hostfile(hosts: dict[str, int]) -> str:
    """The hostfile text for `hosts` (used to write MPI hostfiles and in round-trip tests)."""
    return "".join(f"{host} slots={slots}\n" for host, slots in hosts.items())
