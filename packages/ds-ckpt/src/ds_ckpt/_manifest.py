"""manifest.json: the one description of a checkpoint (tensors, fragments, files, states).

Rank 0 writes it last, inside the temporary directory, so a tag directory that has a readable
manifest is complete by construction.

Format version 2 signs the manifest itself: the file starts with `{"manifest_xxh3_64":"<16 hex>",`
and that XXH3-64 covers every byte after the prefix, so any change to the rest (client_state,
world_size, a fragment's byte range or checksums, even whitespace) is detected before the JSON
is trusted; a damaged prefix makes a version-2 manifest unsigned, which is refused too. The file
stays plain JSON (the checksum is its first key). Version 1 (no checksums) is still read.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from ds_ckpt._checksum import ALGO, CHUNK_BYTES, HEX, check_digests_field, digest_hex
from ds_ckpt._errors import CheckpointCorruptError

FORMAT = "ds-ckpt"
FORMAT_VERSION = 2
FIRST_CHECKSUMMED_VERSION = 2
MANIFEST = "manifest.json"
_SIG_KEY = "manifest_xxh3_64"
_SIG_PREFIX = b'{"' + _SIG_KEY.encode() + b'":"'
_SIG_SUFFIX = b'",'
_SIG_LEN = len(_SIG_PREFIX) + HEX + len(_SIG_SUFFIX)
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
    # XXH3-64 of each 1 MiB chunk, 16 hex chars each (see _checksum); None: version 1
    chunk_hashes: str | None = None

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

    def check_digests(self, chunk_bytes: int) -> str | None:
        """What is wrong with the chunk digests of a version-2 record, or None."""
        return check_digests_field(self.chunk_hashes, self.nbytes, chunk_bytes)


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
    # {"algo": "xxh3_64", "chunk_bytes": n}: how the fragments' `chunk_hashes` were computed
    checksum: dict[str, Any] | None = field(
        default_factory=lambda: {"algo": ALGO, "chunk_bytes": CHUNK_BYTES}
    )
    headers: dict[str, str] = field(default_factory=dict)  # file -> digest of its header bytes

    def to_bytes(self) -> bytes:
        return signed_json(asdict(self))

    @property
    def verified(self) -> bool:
        """Whether the pieces carry chunk checksums (version 2+): loads verify what they read."""
        return self.format_version >= FIRST_CHECKSUMMED_VERSION

    @property
    def chunk_bytes(self) -> int:
        return int(self.checksum["chunk_bytes"]) if self.checksum else CHUNK_BYTES

    def nbytes(self) -> int:
        return sum(self.files.values())


def write_manifest(path: str, m: Manifest) -> None:
    data = m.to_bytes()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def signed_json(obj: dict[str, Any]) -> bytes:
    """The signed file content of a manifest dict: its digest as first key, over all the bytes
    after it."""
    rest = json.dumps(obj, indent=1).encode()[1:]  # drop the opening brace; the prefix has it
    return _SIG_PREFIX + digest_hex(rest).encode() + _SIG_SUFFIX + rest


def _check_signature(path: str, data: bytes) -> bool:
    """Whether `data` is signed; raise when it is signed and the bytes do not match."""
    if not (
        data.startswith(_SIG_PREFIX) and data[_SIG_LEN - len(_SIG_SUFFIX) : _SIG_LEN] == _SIG_SUFFIX
    ):
        return False
    claimed = data[len(_SIG_PREFIX) : len(_SIG_PREFIX) + HEX].decode("ascii", errors="replace")
    got = digest_hex(data[_SIG_LEN:])
    if got != claimed:
        raise CheckpointCorruptError(
            f"{path}: checksum mismatch (the file says {claimed}, its bytes give {got}): the "
            "manifest was edited or corrupted; restore it from a copy or load an older tag"
        )
    return True


def read_manifest(tag_dir: str) -> Manifest:
    """Parse, verify and validate `<tag_dir>/manifest.json`; errors name the file and what is
    wrong."""
    path = os.path.join(tag_dir, MANIFEST)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CheckpointCorruptError(
            f"{path}: missing; {tag_dir} is not a complete ds-ckpt checkpoint"
        ) from None
    signed = _check_signature(path, data)
    try:
        raw = json.loads(data)
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
        if (raw["format_version"] >= FIRST_CHECKSUMMED_VERSION) != signed:
            raise CheckpointCorruptError(
                f"{path}: format_version {raw['format_version']} manifest "
                f"{'with' if signed else 'without'} a valid '{_SIG_KEY}' first line; the "
                "manifest is damaged or was edited; restore it or load an older tag"
            )
        raw.pop(_SIG_KEY, None)
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
            checksum=raw.get("checksum"),
            headers={str(k): str(v) for k, v in (raw.get("headers") or {}).items()},
        )
    except CheckpointCorruptError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointCorruptError(
            f"{path}: malformed manifest ({type(e).__name__}: {e})"
        ) from None
    if m.verified:
        c = m.checksum
        if (
            not isinstance(c, dict)
            or c.get("algo") != ALGO
            or type(c.get("chunk_bytes")) is not int
            or c["chunk_bytes"] <= 0
        ):
            raise CheckpointCorruptError(
                f'{path}: \'checksum\' must be {{"algo": "{ALGO}", "chunk_bytes": n > 0}}, '
                f"got {c!r}; the manifest is corrupt or from a newer ds-ckpt"
            )
        missing = sorted(set(m.files) - set(m.headers))
        if missing:
            raise CheckpointCorruptError(
                f"{path}: no header checksum for file(s) {missing}; the manifest is corrupt"
            )
    for name, t in m.tensors.items():
        for fr in t.fragments:
            bad = fr.check_types()
            if bad is None and m.verified:
                bad = fr.check_digests(m.chunk_bytes)
            if bad is not None:
                raise CheckpointCorruptError(
                    f"{path}: tensor {name!r}, fragment at element {fr.offset!r}: {bad}"
                )
            if fr.file not in m.files or os.sep in fr.file or fr.file.startswith("."):
                raise CheckpointCorruptError(
                    f"{path}: tensor {name!r} refers to file {fr.file!r} not listed in 'files'"
                )
    return m
