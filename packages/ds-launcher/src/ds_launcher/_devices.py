"""Which accelerator a node has, how many, and which variable restricts a process to some of them.

Stdlib only: the launcher must start fast and must not need torch. CUDA GPUs are counted from
`/proc/driver/nvidia/gpus` (the driver's own listing); other accelerators are named with
DS_ACCELERATOR and counted with --num_gpus.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ds_launcher._errors import LauncherError

# accelerator name -> the variable its runtime reads to restrict the visible devices.
VISIBLE_DEVICES_VARS: dict[str, str | None] = {
    "cuda": "CUDA_VISIBLE_DEVICES",
    "xpu": "ZE_AFFINITY_MASK",
    "npu": "ASCEND_RT_VISIBLE_DEVICES",
    "hpu": "HABANA_VISIBLE_MODULES",
    "mlu": "MLU_VISIBLE_DEVICES",
    "cpu": None,
    "mps": None,
}


@dataclass(frozen=True)
class Accelerator:
    """What the launcher knows about this machine's accelerators."""

    name: str
    visible_var: str | None
    # The ids the launching environment already restricts us to (e.g. CUDA_VISIBLE_DEVICES=4,5),
    # indexed by slot number; None when unrestricted, so slot i means device i.
    parent_visible: tuple[str, ...] | None
    # Devices found on this machine; None when the launcher cannot count them (cpu, or a named
    # accelerator without a driver listing), in which case --num_gpus decides.
    count: int | None


def _nvidia_gpu_count(proc_dir: Path) -> int:
    """GPUs the NVIDIA driver lists; `nvidia-smi -L` where /proc is not mounted (some
    containers), 0 when neither is there."""
    try:
        return sum(1 for _ in proc_dir.iterdir())
    except OSError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in listing.stdout.splitlines() if line.startswith("GPU "))


def detect_accelerator(
    environ: Mapping[str, str], proc_dir: Path = Path("/proc/driver/nvidia/gpus")
) -> Accelerator:
    name = environ.get("DS_ACCELERATOR", "").strip().lower()
    if name and name not in VISIBLE_DEVICES_VARS:
        raise LauncherError(
            f"DS_ACCELERATOR={name!r} is not known to ds-launch; use one of "
            f"{', '.join(sorted(VISIBLE_DEVICES_VARS))}"
        )
    gpus = _nvidia_gpu_count(proc_dir) if name in ("", "cuda") else 0
    if not name:
        name = "cuda" if gpus else "cpu"
    var = VISIBLE_DEVICES_VARS[name]
    parent: tuple[str, ...] | None = None
    if var is not None and environ.get(var, "").strip():
        parent = tuple(v.strip() for v in environ[var].split(",") if v.strip())
    if parent is not None:
        count: int | None = len(parent)
    elif name == "cuda":
        count = gpus
    else:
        count = None
    return Accelerator(name=name, visible_var=var, parent_visible=parent, count=count)


def visible_value(slots: list[int] | tuple[int, ...], parent: tuple[str, ...] | None) -> str:
    """The visible-devices value for a node using `slots` (ids within `parent` when set)."""
    if parent is None:
        return ",".join(str(s) for s in slots)
    return ",".join(parent[s] for s in slots)


def parse_core_list(text: str) -> list[int]:
    """`0-3,8,10-11` -> [0, 1, 2, 3, 8, 10, 11] (for --bind_core_list)."""
    cores: list[int] = []
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        if not (lo.isdigit() and (not sep or hi.isdigit())):
            raise LauncherError(
                f"--bind_core_list {text!r}: {part!r} is not a core id or a range like 0-3"
            )
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            raise LauncherError(f"--bind_core_list {text!r}: range {part!r} runs backwards")
        cores.extend(range(first, last + 1))
    if len(set(cores)) != len(cores):
        raise LauncherError(f"--bind_core_list {text!r} names a core twice")
    return cores


def split_cores(cores: list[int], local_world_size: int) -> list[tuple[int, ...]]:
    """Give each local rank an equal, contiguous share of `cores` (the remainder stays unused)."""
    per = len(cores) // local_world_size
    if per < 1:
        raise LauncherError(
            f"--bind_cores_to_rank: {local_world_size} ranks on this node but only {len(cores)} "
            "cores to bind them to; run fewer ranks or drop --bind_cores_to_rank"
        )
    return [tuple(cores[i * per : (i + 1) * per]) for i in range(local_world_size)]


def available_cores() -> list[int]:
    """The logical CPUs this process may run on."""
    return sorted(os.sched_getaffinity(0))


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def physical_cores(allowed: list[int], sysfs: Path = Path("/sys/devices/system/cpu")) -> list[int]:
    """One logical CPU per physical core among `allowed` (its lowest-numbered hyperthread),
    ordered by socket, then CPU id.

    DeepSpeed shares out the physical cores (psutil's count, ids 0..N-1) so that no two ranks
    run on the two hyperthreads of one core. Numbering the threads of a core N apart is only
    a convention, so the topology is read from sysfs instead; where it cannot be read, every
    allowed CPU counts as a core of its own.
    """
    first_of_core: dict[tuple[int, int], int] = {}
    for cpu in allowed:
        topo = sysfs / f"cpu{cpu}" / "topology"
        package, core = _read_int(topo / "physical_package_id"), _read_int(topo / "core_id")
        if package is None or core is None:
            return sorted(allowed)
        key = (package, core)
        first_of_core[key] = min(cpu, first_of_core.get(key, cpu))
    # Sorting by socket keeps each rank's share on one socket where the counts allow it, also
    # on machines that number CPUs round-robin across sockets.
    by_socket = sorted((package, cpu) for (package, _), cpu in first_of_core.items())
    return [cpu for _, cpu in by_socket]


def core_pool(
    core_list: str | None, allowed: list[int], sysfs: Path = Path("/sys/devices/system/cpu")
) -> list[int]:
    """The cores --bind_cores_to_rank shares out: --bind_core_list as given (every core must be
    one this process may use), else one CPU per physical core of the allowed set."""
    if core_list is None:
        return physical_cores(allowed, sysfs)
    cores = parse_core_list(core_list)
    missing = sorted(set(cores) - set(allowed))
    if missing:
        raise LauncherError(
            f"--bind_core_list {core_list!r} names core(s) {','.join(map(str, missing))} that "
            f"this process cannot run on (allowed on {os.uname().nodename}: "
            f"{format_core_list(allowed)}); pick cores from that list"
        )
    return cores


def format_core_list(cores: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8' (for messages)."""
    runs: list[list[int]] = []
    for cpu in sorted(cores):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
