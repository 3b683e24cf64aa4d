"""Tier 1: flag values, misspelled flags and --include/--exclude duplicates, all refused before
anything starts, each error naming the flag and what it accepts."""

from __future__ import annotations

import pytest

from ds_launcher import HostfileError, LauncherError, main, select_resources
from ds_launcher import _cli as cli
from ds_launcher._options import NOT_IMPLEMENTED, Option, split_argv


def _parse(*argv: str):
    options, program = cli.split_argv(list(argv))
    return cli.build_parser().parse_args(options), program


@pytest.mark.parametrize(
    ("flag", "bad", "accepted"),
    [
        ("--num_nodes", "0", "a whole number of at least 1 (or -1, DeepSpeed's default), got 0"),
        ("--num_nodes", "-2", "of at least 1 (or -1, DeepSpeed's default), got -2"),
        ("--num_nodes", "1.5", "got '1.5'"),
        ("--num_gpus", "0", "argument --num_gpus/--num_accelerators: expected a whole number"),
        ("--num_accelerators", "two", "got 'two'"),
        ("--master_port", "0", "--master_port: expected a whole number from 1 to 65535, got 0"),
        ("--master_port", "65536", "from 1 to 65535, got 65536"),
        ("--master_port", "-1", "from 1 to 65535, got -1"),
        ("--master_port", "29500.0", "got '29500.0'"),
        ("--node_rank", "-2", "--node_rank: expected a whole number of at least 0"),
        ("--max_restarts", "-1", "--max_restarts: expected a whole number of at least 0, got -1"),
        ("--term_timeout", "0", "--term_timeout: expected a finite number of seconds above 0"),
        ("--term_timeout", "-5", "above 0 (e.g. 5 or 0.5), got '-5'"),
        ("--term_timeout", "nan", "got 'nan'"),
        ("--term_timeout", "inf", "got 'inf'"),
        ("--term_timeout", "1e999", "got '1e999'"),
        ("--term_timeout", "soon", "got 'soon'"),
        ("--rank_timeout", "0", "--rank_timeout: expected a finite number of seconds above 0"),
        ("--rank_timeout", "-inf", "got '-inf'"),
        ("--launcher", "ssh2", "argument --launcher: invalid choice: 'ssh2'"),
    ],
)
def test_numeric_and_choice_flags_are_range_checked(flag, bad, accepted):
    with pytest.raises(LauncherError) as info:
        _parse(flag, bad, "t.py")
    assert accepted in str(info.value)


def test_accepted_values_and_deepspeeds_minus_one_defaults():
    ns, program = _parse(
        "--num_nodes", "-1", "--num_gpus", "-1", "--node_rank", "-1", "--master_port", "65535",
        "--term_timeout", "0.25", "--rank_timeout", "30", "--max_restarts", "0", "t.py", "-x",
    )  # fmt: skip
    # -1 is DeepSpeed's default for these three ("all" / "not given"): same as leaving it out.
    assert (ns.num_nodes, ns.num_gpus, ns.node_rank) == (None, None, None)
    assert (ns.master_port, ns.term_timeout, ns.rank_timeout) == (65535, 0.25, 30.0)
    assert program == ["t.py", "-x"]
    ns, _ = _parse("t.py")
    assert (ns.term_timeout, ns.rank_timeout, ns.max_restarts) == (5.0, None, 0)


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("10.0.0.1", "10.0.0.1"),
        ("::1", "::1"),
        ("fd00:0:0:0:0:0:0:2", "fd00::2"),
        ("fe80::1%eth0", "fe80::1%eth0"),
        ("localhost", "localhost"),
        ("worker-1.cluster.example.com", "worker-1.cluster.example.com"),
        ("worker-1.cluster.", "worker-1.cluster."),
        ("3com.net", "3com.net"),
        ("trainer_1", "trainer_1"),  # as hostfiles allow: container and ssh-alias names
        ("a" * 63 + "." + "b" * 63, "a" * 63 + "." + "b" * 63),
        ("", None),  # DeepSpeed's default: infer it
    ],
)
def test_master_addr_accepts_addresses_and_rfc1123_names(value, parsed):
    assert _parse("--master_addr", value, "t.py")[0].master_addr == parsed


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("10.0.0.256", "looks like an IPv4 address but is not one"),
        ("2130706433", "looks like an IPv4 address"),
        ("worker/1", "neither an IP address (IPv4 or IPv6) nor a host name (RFC 1123"),
        ("-oProxyCommand=x", "neither"),
        ("host name", "neither"),
        ("a..b", "neither"),
        ("-worker", "neither"),
        ("worker-", "neither"),
        ("a" * 64, "neither"),
        (".".join(["abcdefgh"] * 29), "neither"),  # 260 characters
        ("[::1]", "neither"),
        ("fe80::zz", "neither"),
        ("$(reboot)", "neither"),
    ],
)
def test_master_addr_refuses_what_is_neither(value, why):
    with pytest.raises(LauncherError) as info:
        _parse("--master_addr", value, "t.py")
    msg = str(info.value)
    assert msg.startswith(f"argument --master_addr: {value!r}") and why in msg


@pytest.mark.parametrize(
    ("word", "suggestion"),
    [
        ("--num_gpu", "did you mean --num_gpus?"),
        ("--num_gpu=2", "did you mean --num_gpus?"),
        ("--num-gpus", "did you mean --num_gpus"),
        ("--hostfiel", "did you mean --hostfile?"),
        ("--master-port", "did you mean --master_port?"),
        ("--num", "did you mean --num_nodes, --num_gpus or --num_accelerators?"),
        ("--rank-timeout", "did you mean --rank_timeout?"),
    ],
)
def test_misspelled_and_abbreviated_flags_suggest_the_real_one(word, suggestion):
    with pytest.raises(LauncherError) as info:
        cli.split_argv([word, "2", "t.py"])
    msg = str(info.value)
    assert msg.startswith(f"unknown option {word.split('=')[0]!r}; {suggestion}")


def test_unknown_flags_without_a_near_one_and_deepspeed_flags_not_implemented():
    with pytest.raises(LauncherError, match=r"^unknown option '--zzz' \(ds-launch --help"):
        cli.split_argv(["--zzz", "t.py"])
    for flag, reason in NOT_IMPLEMENTED.items():
        with pytest.raises(LauncherError) as info:
            cli.split_argv([flag, "t.py"])
        assert str(info.value) == (
            f"{flag} is a DeepSpeed launcher flag that ds-launch does not implement: {reason}"
        )


def test_only_options_before_the_script_are_checked():
    assert cli.split_argv(["--num_gpus", "2", "t.py", "--num_gpu", "3"]) == (
        ["--num_gpus=2"],
        ["t.py", "--num_gpu", "3"],
    )
    assert cli.split_argv(["--", "--num_gpu"]) == ([], ["--num_gpu"])


def test_main_in_process_returns_2_for_a_misspelled_flag(capsys):
    assert main(["--num_gpu", "2", "t.py"]) == 2
    assert "ds-launch: error: unknown option '--num_gpu'; did you mean --num_gpus?" in (
        capsys.readouterr().err
    )


def test_a_new_row_is_all_a_new_flag_needs():
    """How DeepSpeed's `--autotuning tune|run` can be added: splitting, parsing, choices and
    suggestions all follow from the table."""
    table = (
        Option(("--num_gpus",), dict(type=int)),
        Option(("--autotuning",), dict(choices=("tune", "run"))),
    )
    assert split_argv(["--autotuning", "tune", "t.py", "a"], table) == (
        ["--autotuning=tune"],
        ["t.py", "a"],
    )
    parser = cli._build_parser(table)
    assert parser.parse_args(["--autotuning=run"]).autotuning == "run"
    with pytest.raises(LauncherError, match="argument --autotuning: invalid choice: 'fast'"):
        parser.parse_args(["--autotuning=fast"])
    with pytest.raises(LauncherError, match="did you mean --autotuning"):
        split_argv(["--autotune", "tune", "t.py"], table)


AVAILABLE = {"worker-0": [0, 1, 2, 3], "Worker-1": [0, 1]}


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(include="worker-0:0,0"), "entry 'worker-0:0,0': slot 0 is listed twice"),
        (dict(include="worker-0:1,2,1"), "slot 1 is listed twice"),
        (dict(exclude="worker-0:3,3"), "slot 3 is listed twice"),
        (dict(include="worker-0:0@worker-0:0,1"), "slot(s) [0] of host 'worker-0' are named twice"),
        (dict(include="worker-0@worker-0"), "host 'worker-0' is named twice"),
        (dict(include="worker-0@WORKER-0:1"), "host 'WORKER-0' is also named as 'worker-0'"),
        (dict(exclude="Worker-1:0@worker-1:1"), "host 'worker-1' is also named as 'Worker-1'"),
        (dict(include="worker-0:-1"), "slot -1 is negative; slots count from 0"),
        (dict(include="worker-0:4"), "names slot 4 of host 'worker-0', but hostfile 'hf' gives"),
        (dict(include="worker-0:99999999999999999999"), "names slot 99999999999999999999"),
        (dict(include="worker-0:"), "slot '' is not a whole number"),
    ],
)
def test_include_exclude_refuse_duplicates_and_bad_slots(kwargs, needle):
    with pytest.raises(HostfileError) as info:
        select_resources(AVAILABLE, source="hostfile 'hf'", **kwargs)
    assert needle in str(info.value)


def test_include_exclude_match_hosts_case_insensitively_in_hostfile_spelling():
    assert select_resources(AVAILABLE, include="WORKER-0:1@worker-1") == {
        "worker-0": [1],
        "Worker-1": [0, 1],
    }
    assert select_resources(AVAILABLE, exclude="WORKER-1") == {"worker-0": [0, 1, 2, 3]}
    # Disjoint slots of one host over several entries stay allowed, as in DeepSpeed.
    assert select_resources(AVAILABLE, include="worker-0:2@worker-0:0") == {"worker-0": [0, 2]}


def test_localhost_in_any_case_is_this_machine():
    assert cli.is_this_machine("LOCALHOST") and cli.is_this_machine("localhost")
