"""Atomic publication of a checkpoint directory and of the `latest` pointer.

Order of a commit: every rank writes and fsyncs its files under `<dir>/.tmp-<tag>-<nonce>/`;
barrier; rank 0 writes manifest.json there, fsyncs the directory, renames it to `<dir>/<tag>`,
fsyncs `<dir>`, then replaces `latest` by write-temp, fsync, rename, fsync `<dir>`. A crash at
any point leaves either the previous state or the new one, never a half-written tag or pointer.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
import warnings

from ds_ckpt._errors import CheckpointCorruptError, CheckpointNotFoundError
from ds_ckpt._manifest import MANIFEST, check_tag, read_manifest

LATEST = "latest"
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"
_LATEST_TMP = f".{LATEST}.tmp-"


def new_nonce() -> str:
    return uuid.uuid4().hex[:12]


def tmp_dir(root: str, tag: str, nonce: str) -> str:
    return os.path.join(root, f"{_TMP_PREFIX}{tag}-{nonce}")


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale(root: str) -> None:
    """Delete temp directories of saves that crashed (rank 0, before a new save starts).

    Only call when no save into `root` is in flight: an async save's temp dir looks the same.
    """
    if not os.path.isdir(root):
        return
    for name in os.listdir(root):
        if name.startswith((_TMP_PREFIX, _OLD_PREFIX)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        elif name.startswith(_LATEST_TMP):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(root, name))


def publish(root: str, tmp: str, tag: str) -> None:
    """Rename the finished temp directory to `<root>/<tag>`, replacing an older one of that tag.

    Replacing takes two renames (old aside, new in); a crash between them leaves no `<tag>`,
    and loading falls back to the newest other complete tag.
    """
    fsync_dir(tmp)
    final = os.path.join(root, tag)
    old = None
    if os.path.lexists(final):
        old = os.path.join(root, f"{_OLD_PREFIX}{tag}-{new_nonce()}")
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_latest(root: str, tag: str) -> None:
    tmp = os.path.join(root, f"{_LATEST_TMP}{new_nonce()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, (tag + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, os.path.join(root, LATEST))
    fsync_dir(root)


def read_latest(root: str) -> tuple[str | None, str]:
    """(tag, "") if `latest` names a complete checkpoint, else (None, why not)."""
    path = os.path.join(root, LATEST)
    try:
        with open(path, "rb") as f:
            raw = f.read(4096)
    except FileNotFoundError:
        return None, f"{path} does not exist"
    try:
        tag = check_tag(raw.decode("utf-8").strip())
    except (UnicodeDecodeError, ValueError):
        return None, f"{path} does not hold a tag name (truncated or garbage: {raw[:40]!r})"
    if not os.path.isfile(os.path.join(root, tag, MANIFEST)):
        return None, f"{path} names tag {tag!r}, which is not a complete checkpoint in {root}"
    return tag, ""


def complete_tags(root: str) -> list[tuple[int, str]]:
    """(created_ns, tag) of every complete checkpoint in `root`, oldest first."""
    out = []
    if not os.path.isdir(root):
        return out
    for name in os.listdir(root):
        if name.startswith(".") or name == LATEST:
            continue
        d = os.path.join(root, name)
        if not os.path.isfile(os.path.join(d, MANIFEST)):
            continue
        try:
            out.append((read_manifest(d).created_ns, name))
        except CheckpointCorruptError:
            continue
    return sorted(out)


def resolve_tag(root: str, tag: str | None) -> str:
    """The tag to load: `tag` itself, else what `latest` names, else the newest complete tag."""
    if tag is not None:
        check_tag(tag)
        if not os.path.isdir(os.path.join(root, tag)):
            have = [t for _, t in complete_tags(root)]
            raise CheckpointNotFoundError(
                f"checkpoint tag {tag!r} does not exist in {root} (complete tags: {have}); pass "
                "tag=None to load the latest"
            )
        return tag
    found, why = read_latest(root)
    if found is not None:
        return found
    tags = complete_tags(root)
    if not tags:
        raise CheckpointNotFoundError(
            f"no complete checkpoint in {root} ({why}); check the directory or save one first"
        )
    newest = tags[-1][1]
    warnings.warn(
        f"{why}; falling back to the newest complete checkpoint {newest!r}",
        RuntimeWarning,
        stacklevel=3,
    )
    return newest
