"""Checks and swap files on ``nvme_path``: fail before training, never half-way through it.

Every swap file is created at setup with its final size and its blocks reserved
(``posix_fallocate``), so a full disk is reported at setup naming the path and the bytes
missing, and later writes go into already reserved blocks instead of failing mid-step.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path

from ds_offload._errors import NvmePathError


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


class SwapDir:
    """A private directory of swap files under an nvme_path, removed on ``close``."""

    def __init__(self, root: Path, key: str, tag: str) -> None:
        self.key = key
        self.dir = root / f"ds_offload_{tag}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self.dir.mkdir(parents=True)
        self.files: list[Path] = []

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
        shutil.rmtree(self.dir, ignore_errors=True)
