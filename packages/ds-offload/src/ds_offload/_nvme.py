"""Checks and swap files on ``nvme_path``: fail before training, never half-way through it.

Every swap file is created at setup with its final size and its blocks reserved
(``posix_fallocate``), so a full disk is reported at setup naming the path and the bytes
missing, and later writes go into already reserved blocks instead of failing mid-step.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import uuid
import weakref
from pathlib import Path

from ds_offload._errors import NvmePathError

log = logging.getLogger("ds_offload")


def check_nvme_path(path: str | os.PathLike[str] | None, key: str) -> Path:
    """``path`` as a Path after checking it is an existing, writable directory."""
    if path is None:
        raise NvmePathError(f"{key} is not set; set it to a directory on the NVMe drive")
    p = Path(path)
    if not p.exists():
        raise NvmePathError(
            f"{key}={str(p)!r} does not exist; create the directory (mkdir -p {p}) or point "
            f"{key} at an existing directory"
        )
    if not p.is_dir():
        raise NvmePathError(f"{key}={str(p)!r} is not a directory; point it at a directory")
    probe = p / f".ds_offload_probe_{uuid.uuid4().hex}"
    try:
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as exc:
        raise NvmePathError(
            f"{key}={str(p)!r} is not writable ({exc.strerror}); fix its permissions or choose "
            "another directory"
        ) from None
    return p


LOCK = ".lock"


def _owner_gone(directory: Path) -> bool:
    """True when no process holds the directory's lock (its owner exited or was killed). A
    lock, not a pid: it also holds across containers and pid namespaces on one machine."""
    try:
        fd = os.open(directory / LOCK, os.O_RDWR)
    except OSError:
        return False  # no lock file: not ours to judge
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False  # held: a live run
    finally:
        os.close(fd)  # also drops the lock we may have taken


def remove_stale(root: Path, tag: str) -> list[Path]:
    """Remove swap directories under ``root`` whose owning process is gone (a run killed with
    SIGKILL cannot clean up, and each would keep its whole offloaded state on the drive)."""
    removed = []
    try:
        entries = [e for e in root.iterdir() if e.name.startswith(f"ds_offload_{tag}_")]
    except OSError:
        return removed
    for entry in entries:
        if entry.is_dir() and _owner_gone(entry):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _cleanup(directory: str, lock_fd: int) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.close(lock_fd)


class SwapDir:
    """A private directory of swap files under an nvme_path, removed on ``close``, at
    interpreter exit, or, if this process is killed, by the next run using the same path."""

    def __init__(self, root: Path, key: str, tag: str) -> None:
        self.key = key
        stale = remove_stale(root, tag)
        if stale:
            log.warning("ds_offload: removed %d swap director%s left by runs that ended under %s",
                        len(stale), "y" if len(stale) == 1 else "ies", root)  # fmt: skip
        self.dir = root / f"ds_offload_{tag}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self.dir.mkdir(parents=True)
        self.files: list[Path] = []
        lock_fd = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held for this object's lifetime
        # runs at close() or, if the owner forgets, when it is collected or at interpreter exit
        self._remove = weakref.finalize(self, _cleanup, str(self.dir), lock_fd)

    def reserve(self, sizes: dict[str, int]) -> dict[str, Path]:
        """Create every file at its final size with its blocks allocated; all or nothing."""
        need = sum(sizes.values())
        free = shutil.disk_usage(self.dir).free
        if need > free:
            raise NvmePathError(
                f"{self.key}={str(self.dir.parent)!r} has {free} bytes free but the offloaded "
                f"state needs {need}; free space, choose a larger drive, or offload less "
                "(ratio, or device: cpu)"
            )
        made: dict[str, Path] = {}
        try:
            for name, size in sizes.items():
                path = self.dir / name
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                made[name] = path
                try:
                    if size > 0:
                        os.posix_fallocate(fd, 0, size)
                finally:
                    os.close(fd)
        except OSError as exc:
            for path in made.values():
                path.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NvmePathError(
                    f"{self.key}={str(self.dir.parent)!r} is full: reserving {need} bytes of swap "
                    f"files failed ({exc.strerror}); free space or choose a larger drive"
                ) from None
            raise NvmePathError(
                f"{self.key}={str(self.dir.parent)!r}: creating swap files failed: {exc}"
            ) from None
        self.files.extend(made.values())
        return made

    def close(self) -> None:
        self._remove()
