"""manifest.json: the one description of a checkpoint (tensors, fragments, files, states).

Rank 0 writes it last, inside the temporary directory, so a tag directory that has a readable
manifest is complete by construction.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from ds_ckpt._errors import CheckpointCorruptError

FORMAT = "ds-ckpt"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.=+-]{0,199}$")


def check_tag(tag: str) -> str:
    """Tags become directory names: refuse separators, dot-names and the pointer's name."""
    if not isinstance(tag, str) or not _TAG_RE.match(tag) or tag == "latest":
        raise ValueError(
            f"checkpoint tag {tag!r} is not usable as a directory name; use letters, digits and "
            "_ . = + - (not starting with '.', not 'latest'), e.g. 'global_step100'"
        )
    return tag


@dataclass
class FragmentRecord:
    """Elements [offset, offset+numel) of a tensor, stored at bytes [byte_start, +nbytes)."""

    file: str
    key: str  # the tensor's key inside the safetensors file
    offset: int
    numel: int
    byte_start: int
    nbytes: int
    sha256: str | None  # None: saved with hashes=False

    @property
    def end(self) -> int:
        return self.byte_start + self.nbytes

    def check_types(self) -> str | None:
        """What is wrong with the field types (a hand-edited or foreign manifest), or None."""
        for f in ("offset", "numel", "byte_start", "nbytes"):
            v = getattr(self, f)
            if type(v) is not int or v < 0:
                return f"{f} must be a non-negative integer, got {v!r}"
        if not isinstance(self.file, str) or not isinstance(self.key, str):
            return f"file and key must be strings, got {self.file!r}, {self.key!r}"
        if self.sha256 is not None and not isinstance(self.sha256, str):
            return f"sha256 must be a hex string or null, got {self.sha256!r}"
        return None


@dataclass
class TensorRecord:
    shape: list[int]
    dtype: str  # safetensors dtype name
    fragments: list[FragmentRecord] = field(default_factory=list)


@dataclass
class Manifest:
    tag: str
    world_size: int
    created_ns: int
    files: dict[str, int]  # file name -> size in bytes
    tensors: dict[str, TensorRecord]
    client_state: Any = None
    rank_states: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=False)

    def nbytes(self) -> int:
        return sum(self.files.values())


def write_manifest(path: str, m: Manifest) -> None:
    data = m.to_json().encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(tag_dir: str) -> Manifest:
    """Parse and validate `<tag_dir>/manifest.json`; errors name the file and what is wrong."""
    path = os.path.join(tag_dir, MANIFEST)
    try:
        with open(path, "rb") as f:
            raw = json.loads(f.read())
    except FileNotFoundError:
        raise CheckpointCorruptError(
            f"{path}: missing; {tag_dir} is not a complete ds-ckpt checkpoint"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointCorruptError(f"{path}: not valid JSON ({e})") from None
    try:
        if raw.get("format") != FORMAT:
            raise CheckpointCorruptError(f"{path}: not a ds-ckpt manifest (format field)")
        if raw["format_version"] > FORMAT_VERSION:
            raise CheckpointCorruptError(
                f"{path}: format_version {raw['format_version']} is newer than this ds-ckpt "
                f"reads ({FORMAT_VERSION}); upgrade ds-ckpt"
            )
        tensors = {
            name: TensorRecord(
                shape=[int(s) for s in t["shape"]],
                dtype=str(t["dtype"]),
                fragments=[FragmentRecord(**fr) for fr in t["fragments"]],
            )
            for name, t in raw["tensors"].items()
        }
        m = Manifest(
            tag=raw["tag"],
            world_size=int(raw["world_size"]),
            created_ns=int(raw["created_ns"]),
            files={str(k): int(v) for k, v in raw["files"].items()},
            tensors=tensors,
            client_state=raw.get("client_state"),
            rank_states=raw.get("rank_states") or {},
            format=raw["format"],
            format_version=int(raw["format_version"]),
        )
    except CheckpointCorruptError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointCorruptError(
            f"{path}: malformed manifest ({type(e).__name__}: {e})"
        ) from None
    for name, t in m.tensors.items():
        for fr in t.fragments:
            bad = fr.check_types()
            if bad is not None:
                raise CheckpointCorruptError(
                    f"{path}: tensor {name!r}, fragment at element {fr.offset!r}: {bad}"
                )
            if fr.file not in m.files or os.sep in fr.file or fr.file.startswith("."):
                raise CheckpointCorruptError(
                    f"{path}: tensor {name!r} refers to file {fr.file!r} not listed in 'files'"
                )
    return m
