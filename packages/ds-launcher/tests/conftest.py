"""Shared fixtures: running ds-launch as a real process, system tools, a throwaway sshd."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parent / "scripts"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs an accelerator (DS_TEST_GPU=1 on a GPU machine)")


def require_tool(*names: str) -> None:
    """Skip when a system tool is missing; fail instead under DS_REQUIRE_SYSTEM_TOOLS=1 (CI)."""
    for name in names:
        if shutil.which(name) is None and not Path(name).is_file():
            msg = f"system tool {name!r} is not installed"
            if os.environ.get("DS_REQUIRE_SYSTEM_TOOLS") == "1":
                pytest.fail(msg + " (DS_REQUIRE_SYSTEM_TOOLS=1)")
            pytest.skip(msg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # The tests decide what ranks see; do not let the developer's settings leak in.
    for name in ("DS_ACCELERATOR", "CUDA_VISIBLE_DEVICES", "DS_ENV_FILE"):
        env.pop(name, None)
    env["DS_ACCELERATOR"] = "cpu"
    # The launcher runs in a temporary directory: relative PYTHONPATH entries must not break.
    if env.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join(
            os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep) if p
        )
    env.update(extra)
    return env


def run_launcher(
    args: list[str], cwd: Path, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m ds_launcher ARGS` in `cwd`; fails the test (not hangs) past `timeout`."""
    return subprocess.run(
        [sys.executable, "-m", "ds_launcher", *args],
        cwd=cwd,
        env=env or launcher_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def process_gone(pid: int) -> bool:
    """True when `pid` no longer runs (a zombie counts as gone: it holds no resources)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(b")") + 2 :].split()[0] == b"Z"


def wait_gone(pids: list[int], timeout: float = 5.0) -> list[int]:
    """The pids still running after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if not process_gone(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def read_pids(directory: Path) -> list[int]:
    return [int(p.read_text()) for p in sorted(directory.glob("pid_*")) if p.read_text()]


@dataclass
class Sshd:
    """A private sshd on 127.0.0.1 and 127.0.0.2, reachable as `node-a` and `node-b`."""

    port: int
    ssh_config: Path

    @property
    def ssh_args(self) -> str:
        return f"-F {self.ssh_config}"


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Sshd:
    require_tool("/usr/sbin/sshd", "ssh", "ssh-keygen")
    if not Path("/run/sshd").is_dir():
        # sshd refuses to start without its privilege-separation directory.
        if os.geteuid() != 0:
            pytest.skip("/run/sshd is missing and only root can create it")
        Path("/run/sshd").mkdir(mode=0o755)
    d = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "id_key"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True
        )
    (d / "authorized_keys").write_text((d / "id_key.pub").read_text())
    port = free_port()
    user = (
        os.environ.get("USER")
        or subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    )
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nListenAddress 127.0.0.2\n"
        f"HostKey {d / 'host_key'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nStrictModes no\nPermitRootLogin yes\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        "MaxStartups 100\nLogLevel ERROR\n"
    )
    ssh_config = d / "ssh_config"
    ssh_config.write_text(
        "Host node-a\n  HostName 127.0.0.1\nHost node-b\n  HostName 127.0.0.2\n"
        f"Host *\n  Port {port}\n  User {user}\n  IdentityFile {d / 'id_key'}\n"
        "  IdentitiesOnly yes\n  UserKnownHostsFile /dev/null\n  StrictHostKeyChecking no\n"
        "  BatchMode yes\n  LogLevel ERROR\n"
    )
    log = open(d / "sshd.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        ["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            probe = subprocess.run(
                ["ssh", "-F", str(ssh_config), "node-b", "true"], capture_output=True, timeout=15
            )
            if probe.returncode == 0:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"test sshd did not come up: {(d / 'sshd.log').read_text()} "
                    f"{probe.stderr.decode(errors='replace')}"
                )
            time.sleep(0.2)
        yield Sshd(port, ssh_config)
    finally:
        # The listener and any session process it forked (same process group).
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
