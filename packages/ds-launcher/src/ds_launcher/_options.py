"""ds-launch's command-line options: one table, value checks, and the launcher/script split.

Every option is one `Option` row of `OPTIONS`; the parser, the splitter (which must know which
options take a value), the misspelling suggestions and `--help` all read that table, so adding
a flag (for example DeepSpeed's `--autotuning tune|run`, with `choices=`) is one new row and
nothing else. Numeric options declare their accepted range through their `type=`, so bad values
are refused before anything starts, with the flag and the range in the message.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NoReturn

from ds_launcher._errors import LauncherError

DEFAULT_HOSTFILE = "/job/hostfile"
DEFAULT_MULTINODE_PORT = 29500


def whole_number(
    low: int, high: int | None = None, *, all_sentinel: bool = False
) -> Callable[[str], int | None]:
    """An argparse `type` accepting whole numbers in [low, high].

    With `all_sentinel`, -1 is also accepted and parsed as None: it is DeepSpeed's default for
    --num_nodes/--num_gpus/--node_rank ("all" / "not given"), and wrappers spell it out.
    """
    accepted = (
        f"a whole number from {low} to {high}"
        if high is not None
        else f"a whole number of at least {low}"
    )
    if all_sentinel:
        accepted += " (or -1, DeepSpeed's default)"

    def parse(text: str) -> int | None:
        try:
            value = int(text.strip(), 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {accepted}, got {text!r}") from None
        if all_sentinel and value == -1:
            return None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {accepted}, got {value}")
        return value

    return parse


def seconds(text: str) -> float:
    """An argparse `type` for durations: a finite number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    # NaN compares false with everything, so it must be refused explicitly, as must inf: a
    # deadline of `now + inf` is never reached.
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(
            f"expected a finite number of seconds above 0 (e.g. 5 or 0.5), got {text!r}"
        )
    return value


# RFC 1123 labels: letters, digits and '-', 1-63 characters, no '-' at either end. '_' is
# allowed too, as in hostfiles: the default MASTER_ADDR can be a hostfile name, container and
# ssh-alias names use it, and resolvers (glibc, Docker's DNS) accept it.
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def host_or_address(text: str) -> str | None:
    """An argparse `type` for --master_addr: an IPv4/IPv6 address or an RFC 1123 host name.

    The empty string means "infer it", as in DeepSpeed (its default is "").
    """
    if text == "":
        return None
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    name = text.removesuffix(".")
    labels = name.split(".")
    if len(name) <= 253 and all(_LABEL.fullmatch(label) for label in labels):
        if not labels[-1].isdigit():
            return text
        # All-digit names are what getaddrinfo reads as (possibly mistyped) IPv4 addresses:
        # "10.0.0.256" or "2130706433" would not mean a host called that.
        raise argparse.ArgumentTypeError(
            f"{text!r} looks like an IPv4 address but is not one (four numbers 0-255 "
            "separated by dots)"
        )
    raise argparse.ArgumentTypeError(
        f"{text!r} is neither an IP address (IPv4 or IPv6) nor a host name (RFC 1123: "
        "dot-separated labels of letters, digits, '-' and '_', each 1-63 characters and not "
        "starting or ending with '-', at most 253 characters in all)"
    )


@dataclass(frozen=True)
class Option:
    flags: tuple[str, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def takes_value(self) -> bool:
        return self.kwargs.get("action") not in ("store_true", "store_false", "version", "help")


def options(version: str, runners: tuple[str, ...]) -> tuple[Option, ...]:
    """DeepSpeed's runner flags (same names, same meaning) plus ds-launch's own."""
    return (
        Option(("-H", "--hostfile"), dict(help=f"hostfile ('host slots=N' lines); default {DEFAULT_HOSTFILE} when it exists, else this machine")),
        Option(("-i", "--include"), dict(help="hosts/slots to use, e.g. 'worker-1:0,1@worker-2'")),
        Option(("-e", "--exclude"), dict(help="hosts/slots to leave out, same syntax as --include")),
        Option(("--num_nodes",), dict(type=whole_number(1, all_sentinel=True), help="use the first N hosts")),
        Option(("--num_gpus", "--num_accelerators"), dict(type=whole_number(1, all_sentinel=True), dest="num_gpus", help="use the first N slots of each host (on a CPU machine: the number of processes)")),
        Option(("--master_addr",), dict(type=host_or_address, help="address or host name of rank 0; default 127.0.0.1 on one machine; with ssh/pdsh the first address 'hostname -I' prints on the first host (as DeepSpeed), else the first host's name")),
        Option(("--master_port",), dict(type=whole_number(1, 65535), help=f"rendezvous TCP port (1-65535); default a free port on one machine, else {DEFAULT_MULTINODE_PORT}")),
        Option(("--launcher",), dict(type=str.lower, choices=runners, help="how to start the nodes; default local on one machine, else ssh")),
        Option(("--launcher_args",), dict(default="", help="extra options for the runner (ssh, pdsh, mpirun, mpiexec, srun), split like a shell would")),
        Option(("--no_ssh",), dict(action="store_true", help="start only this node's ranks (run ds-launch on every node yourself, with --node_rank)")),
        Option(("--node_rank",), dict(type=whole_number(0, all_sentinel=True), help="this node's index in the hostfile selection, with --no_ssh")),
        Option(("--force_multi",), dict(action="store_true", help="use a multi-node runner even for a single host")),
        Option(("--module",), dict(action="store_true", help="run the script as a module (python -m)")),
        Option(("--no_python",), dict(action="store_true", help="run the script as an executable, not with python")),
        Option(("--no_local_rank",), dict(action="store_true", help="accepted for DeepSpeed compatibility; ds-launch never appends --local_rank (ranks read LOCAL_RANK)")),
        Option(("--env_file",), dict(action="append", default=[], help="extra VAR=VALUE file exported to every rank (repeatable); .ds_env/.deepspeed_env are read from home and the working directory")),
        Option(("--max_restarts",), dict(type=whole_number(0), default=0, help="restart the whole group this many times after a failure, on a fresh port")),
        Option(("--log_dir",), dict(help="also write each rank's output to <log_dir>/rank_<N>.log")),
        Option(("--bind_cores_to_rank",), dict(action="store_true", help="pin each local rank to an equal share of the cores; sets OMP_NUM_THREADS")),
        Option(("--bind_core_list",), dict(help="cores to share out with --bind_cores_to_rank, e.g. 0-15,32-47")),
        Option(("--term_timeout",), dict(type=seconds, default=5.0, help="seconds between SIGTERM and SIGKILL when stopping ranks (default 5)")),
        Option(("--rank_timeout",), dict(type=seconds, help="ds-launch extension: stop the job when a rank makes no progress for this many seconds, counted from its last heartbeat (ds_launcher.heartbeat()) or from the first rank's successful exit")),
        Option(("--autotuning",), dict(default="", choices=("tune", "run"), help="run the autotuner (ds-profile) on the job: 'tune' writes the best config, 'run' also starts the job with it")),
        Option(("--version",), dict(action="version", version=f"ds-launch {version}")),
    )  # fmt: skip


# DeepSpeed runner flags that ds-launch does not implement: refused with the reason, never
# silently ignored (a row of `options` replaces an entry here when one is implemented).
NOT_IMPLEMENTED: Mapping[str, str] = MappingProxyType(
    {
        "--no_ssh_check": "ds-launch runs no ssh pre-check to skip; drop the flag",
        "--save_pid": "ds-launch writes no pid file; use the launcher's own pid ($!)",
        "--enable_each_rank_log": "use --log_dir DIR (one DIR/rank_N.log per rank)",
        "--ssh_port": "pass it to ssh with --launcher_args '-p PORT'",
        "--venv_script": "activate the environment in your login shell profile, or use --env_file",
        "--log_level": "ds-launch prints only its start line, failures and stops",
        "--quiet": "ds-launch prints only its start line, failures and stops",
        "-q": "ds-launch prints only its start line, failures and stops",
    }
)


class _Parser(argparse.ArgumentParser):
    """argparse that raises LauncherError instead of exiting, so `main(argv)` called in-process
    returns 2 for a bad flag like for any other bad input, with one message format."""

    def error(self, message: str) -> NoReturn:
        raise LauncherError(message)


def build_parser(table: tuple[Option, ...]) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ds-launch",
        usage="ds-launch [options] script.py [script args...]",
        description="Launch a distributed PyTorch program on one or more machines.",
        # DeepSpeed's parser takes unambiguous prefixes (`--num_gpu` for `--num_gpus`). Here a
        # prefix is an error with a suggestion instead: a prefix that works today changes
        # meaning or breaks when a flag is added, and the split between launcher options and
        # script arguments must know every option exactly.
        allow_abbrev=False,
    )
    for option in table:
        parser.add_argument(*option.flags, **option.kwargs)
    return parser


def _known(word: str, table: tuple[Option, ...]) -> Option | None:
    """The option `word` spells (`--flag`, `--flag=value`, `-Hvalue`), or None."""
    for option in table:
        for flag in option.flags:
            if word == flag:
                return option
            if option.takes_value and flag.startswith("--") and word.startswith(flag + "="):
                return option
            if option.takes_value and not flag.startswith("--") and word.startswith(flag):
                return option
    return None


def unknown_option(word: str, table: tuple[Option, ...]) -> LauncherError:
    """The error for an option ds-launch does not know, with the nearest real flags."""
    name = word.split("=", 1)[0]
    if name in NOT_IMPLEMENTED:
        return LauncherError(
            f"{name} is a DeepSpeed launcher flag that ds-launch does not implement: "
            f"{NOT_IMPLEMENTED[name]}"
        )
    flags = [flag for option in table for flag in option.flags if flag.startswith("--")]
    # `--num-gpus` is `--num_gpus` spelled with dashes; a prefix (which DeepSpeed's argparse
    # would have taken) names its completions; anything else gets the closest spellings.
    canon = "--" + name[2:].replace("-", "_") if name.startswith("--") else name
    if canon in flags:
        guesses = [canon]
    else:
        guesses = (
            [flag for flag in flags if flag.startswith(canon)] if name.startswith("--") else []
        )
    if not guesses:
        guesses = difflib.get_close_matches(canon, flags, n=3, cutoff=0.6)
    named = ", ".join(guesses[:-1]) + " or " + guesses[-1] if len(guesses) > 1 else "".join(guesses)
    hint = f"; did you mean {named}?" if guesses else ""
    return LauncherError(
        f"unknown option {name!r}{hint} (ds-launch --help lists the options; a script "
        "argument that starts with '-' goes after the script name, or after '--')"
    )


def split_argv(argv: list[str], table: tuple[Option, ...]) -> tuple[list[str], list[str]]:
    """(launcher options, [script, *script args]). An explicit `--` may precede the script.

    The first word that is not an option or an option's value is the script; everything after
    it belongs to the script, untouched. Option values are glued to their option
    (`--launcher_args=-v`, `-Hfile`) so that argparse accepts values starting with '-', such as
    `--launcher_args --oversubscribe`. An unknown option raises LauncherError with suggestions.
    """
    options: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            return options, argv[i + 1 :]
        if not word.startswith("-") or word == "-":
            return options, argv[i:]
        if word in ("-h", "--help"):
            options.append(word)
            i += 1
            continue
        option = _known(word, table)
        if option is None:
            raise unknown_option(word, table)
        if option.takes_value and word in option.flags and i + 1 < len(argv):
            glue = "=" if word.startswith("--") else ""
            options.append(word + glue + argv[i + 1])
            i += 2
        else:
            options.append(word)
            i += 1
    return options, []
