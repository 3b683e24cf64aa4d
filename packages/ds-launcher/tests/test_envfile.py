"""Tier 1: env files and the set of variables exported to remote ranks."""

from __future__ import annotations

import pytest

from ds_launcher import EnvFileError, parse_env_file
from ds_launcher._envfile import collect_exports, default_env_files


def test_values_are_verbatim_or_unquoted_never_expanded():
    text = (
        "# comment\n\n"
        "PLAIN=a b $(touch x) `y` $HOME\n"
        "export EXPORTED=1\n"
        "SINGLE='it has \"double\" and $(z)'\n"
        'DOUBLE="tab\\tnew\\nline \\"q\\" back\\\\slash $(w)"\n'
        "EMPTY=\n"
        "EQUALS=a=b=c\n"
        "PLAIN=overridden later\n"
    )
    assert parse_env_file(text) == {
        "PLAIN": "overridden later",
        "EXPORTED": "1",
        "SINGLE": 'it has "double" and $(z)',
        "DOUBLE": 'tab\tnew\nline "q" back\\slash $(w)',
        "EMPTY": "",
        "EQUALS": "a=b=c",
    }


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("NO_EQUALS", "expected VAR=VALUE"),
        ("1BAD=x", "not a valid environment variable name"),
        ("BAD-NAME=x", "not a valid environment variable name"),
        ("OPEN='abc", "never closed"),
        ('ESC="\\q"', "unknown escape"),
        ('Q="a"b"', "unescaped"),
    ],
)
def test_bad_lines_name_file_and_line(line, needle):
    with pytest.raises(EnvFileError) as info:
        parse_env_file(f"OK=1\n{line}\n", "/x/.ds_env")
    assert needle in str(info.value)
    assert "/x/.ds_env:2:" in str(info.value)


def test_default_files_home_then_cwd_and_ds_env_wins(tmp_path, monkeypatch):
    home, cwd = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    cwd.mkdir()
    (home / ".deepspeed_env").write_text("A=home-ds\nB=home-ds\nC=home-ds\n")
    (cwd / ".deepspeed_env").write_text("B=cwd-ds\n")
    (cwd / ".ds_env").write_text("C=cwd-ours\n")
    monkeypatch.delenv("DS_ENV_FILE", raising=False)
    files = default_env_files(cwd=cwd, home=home)
    assert files == [home / ".deepspeed_env", cwd / ".deepspeed_env", cwd / ".ds_env"]
    exports = collect_exports({}, files)
    assert exports == {"A": "home-ds", "B": "cwd-ds", "C": "cwd-ours"}


def test_ds_env_file_renames_deepspeeds_file(tmp_path, monkeypatch):
    (tmp_path / "custom_env").write_text("X=1\n")
    monkeypatch.setenv("DS_ENV_FILE", "custom_env")
    assert default_env_files(cwd=tmp_path, home=tmp_path / "nohome") == [tmp_path / "custom_env"]


def test_exports_take_nccl_python_and_the_visible_devices_variable():
    environ = {
        "NCCL_IB_HCA": "mlx5",
        "PYTHONPATH": "/src",
        "CUDA_VISIBLE_DEVICES": "2,3",
        "HOME": "/root",
        "PATH": "/bin",
        "UCX_TLS": "rc",
    }
    exports = collect_exports(environ, [], ("CUDA_VISIBLE_DEVICES",))
    assert exports == {
        "NCCL_IB_HCA": "mlx5",
        "PYTHONPATH": "/src",
        "CUDA_VISIBLE_DEVICES": "2,3",
        "UCX_TLS": "rc",
    }
