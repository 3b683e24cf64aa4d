"""save(): plan, snapshot, write (inline or on a background thread), then a collective commit.

Every collective is issued from the caller's thread in the same order on every rank: the
background writer only touches files. An async save is therefore committed (gather of the
per-rank file index, manifest, rename, `latest`) by the next save() or by finalize(), which is
also where a writer failure on any rank is raised on every rank.
"""

from __future__ import annotations

import enum
import os
import shutil
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ds_accel import get_accelerator
from ds_ckpt._comm import Comm
from ds_ckpt._commit import new_nonce, publish, remove_stale, tmp_dir, write_latest
from ds_ckpt._dtypes import from_st, itemsize, to_st
from ds_ckpt._errors import AsyncSaveError, CheckpointError
from ds_ckpt._fragment import FragmentLike, check_fragments
from ds_ckpt._jsonstate import encode
from ds_ckpt._manifest import (
    MANIFEST,
    FragmentRecord,
    Manifest,
    TensorRecord,
    check_tag,
    write_manifest,
)
from ds_ckpt._plan import HeldRange, Piece, plan_writes
from ds_ckpt._stfile import layout, write_file

_STAGING_ALIGN = 64  # staging slices are viewed as any dtype: keep them element-aligned
_REMOVE_TRIES = 5  # rmtree passes over a failed save's temp dir before reporting it left behind


class SaveState(enum.Enum):
    """Lifecycle of one save on one rank."""

    WRITING = "writing"  # the writer (inline or background) owns the snapshot/source tensors
    WRITTEN = "written"  # files fsynced in the temp dir; the snapshot may be reused
    COMMITTED = "committed"  # manifest written, directory renamed, `latest` updated
    FAILED = "failed"  # some rank failed; the temp dir was removed


@dataclass
class _Job:
    comm: Comm
    root: str
    tag: str
    tmp: str
    client_state: Any
    rank_state: Any
    update_latest: bool
    shapes: dict[str, tuple[list[int], str]]  # name -> (global shape, dtype), from the plan
    future: Future | None = None  # background writer; None for a synchronous save
    result: dict | None = None  # written file index of this rank (inline save)
    state: SaveState = SaveState.WRITING


@dataclass
class SaveHandle:
    """What save() returns. For an async save, wait() commits (collective: call on all ranks)."""

    tag: str
    path: str
    _saver: Saver | None = field(default=None, repr=False)
    _job: _Job | None = field(default=None, repr=False)

    @property
    def state(self) -> SaveState:
        return self._job.state if self._job else SaveState.COMMITTED

    def wait(self) -> None:
        if self._saver is not None and self._job is not None:
            self._saver.finalize()


class Saver:
    """Owns the background writer thread, the reusable snapshot buffer and the pending save.

    One module-level default instance backs ds_ckpt.save/finalize; tests may make their own.
    """

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pending: _Job | None = None
        self._staging: torch.Tensor | None = None

    # ---- public operations -------------------------------------------------------------
    def save(
        self,
        root: str,
        tag: str,
        fragments: list[FragmentLike],
        client_state: Any = None,
        *,
        group: Any = None,
        async_: bool = False,
        rank_state: Any = None,
        update_latest: bool = True,
        hashes: bool = True,
    ) -> SaveHandle:
        self.finalize()  # commits the previous async save, or raises its failure everywhere
        comm = Comm(group)
        root = os.fspath(root)
        local_error = None
        frags: list[FragmentLike] = []
        nonce = None
        held: list[list] = []
        enc_client = enc_rank = None
        try:
            check_tag(tag)
            frags = check_fragments(fragments, for_load=False)
            held = [
                [
                    f.name,
                    [int(s) for s in f.global_shape],
                    to_st(f.dtype, what=f.name),
                    int(f.offset),
                    int(f.numel),
                ]
                for f in frags
            ]
            enc_client = encode(client_state) if comm.rank == 0 else None
            enc_rank = encode(rank_state, "rank_state")
            if comm.rank == 0:
                os.makedirs(root, exist_ok=True)
                remove_stale(root)
                nonce = new_nonce()
                os.makedirs(tmp_dir(root, tag, nonce))
        except Exception as e:  # reported through the gather so that no rank is left waiting
            local_error = f"{type(e).__name__}: {e}"
        infos = comm.all_gather_json({"held": held, "nonce": nonce, "error": local_error})
        # rank 0 may have made the temp dir before another rank's input was refused
        made = tmp_dir(root, tag, infos[0]["nonce"]) if infos[0]["nonce"] else None
        _raise_if_failed(infos, f"save of {tag!r} to {root}", comm, cleanup=made)
        tmp = tmp_dir(root, tag, infos[0]["nonce"])
        try:
            plan = plan_writes(
                [
                    HeldRange(r, i, h[0], tuple(h[1]), h[2], h[3], h[4])
                    for r, info in enumerate(infos)
                    for i, h in enumerate(info["held"])
                ],
                {h[0]: itemsize(from_st(h[2])) for info in infos for h in info["held"]},
            )
        except ValueError as e:  # identical on every rank: all raise, nobody waits
            if comm.rank == 0:
                remove_tree(tmp)
            comm.barrier()  # no rank raises while the temp dir still exists
            raise CheckpointError(f"save of {tag!r} to {root}: {e}") from None
        pieces = plan.get(comm.rank, [])
        shapes = {h[0]: (h[1], h[2]) for info in infos for h in info["held"]}
        job = _Job(comm, root, tag, tmp, enc_client, enc_rank, update_latest, shapes)
        if async_:
            data = self._snapshot(frags, pieces)
            job.future = self._executor().submit(
                _write_rank_file, tmp, comm.rank, pieces, data, hashes
            )
            self._pending = job
            return SaveHandle(tag, os.path.join(root, tag), self, job)
        try:
            # device tensors stream through the writer's few pinned buffers: no staging copy
            # of the whole rank's state, and no host memory held between saves
            data = [t.contiguous() for t in _sources(frags, pieces, to_cpu=False)]
            job.result = _write_rank_file(tmp, comm.rank, pieces, data, hashes)
        except Exception as e:
            job.result = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
        self._commit(job)
        return SaveHandle(tag, os.path.join(root, tag))

    def finalize(self) -> None:
        """Commit the pending async save (collective); raise on every rank if any rank failed."""
        job, self._pending = self._pending, None
        if job is None:
            return
        try:
            job.result = job.future.result()
        except Exception as e:
            job.result = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
        self._commit(job)

    def close(self) -> None:
        self.finalize()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    # ---- internals ------------------------------------------------------------------------
    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ds-ckpt-writer")
        return self._pool

    def _snapshot(self, frags: list[FragmentLike], pieces: list[Piece]) -> list[torch.Tensor]:
        """Copy this rank's pieces to one CPU buffer (pinned when a source is on a device), so
        training may change the tensors as soon as save() returns."""
        srcs = _sources(frags, pieces, to_cpu=False)
        offs, total = [], 0
        for t in srcs:
            offs.append(total)
            total += -(-t.numel() * t.element_size() // _STAGING_ALIGN) * _STAGING_ALIGN
        on_device = any(t.device.type != "cpu" for t in srcs)
        st = self._staging
        if st is None or st.numel() < total or (on_device and not st.is_pinned()):
            st = torch.empty(total, dtype=torch.uint8, pin_memory=on_device)
            self._staging = st
        out = []
        for t, o in zip(srcs, offs):
            dst = st[o : o + t.numel() * t.element_size()].view(t.dtype)
            dst.copy_(t, non_blocking=t.device.type != "cpu")
            out.append(dst)
        if on_device:
            get_accelerator().synchronize()
        return out

    def _commit(self, job: _Job) -> None:
        comm = job.comm
        payload = dict(job.result or {})
        payload["rank_state"] = job.rank_state
        infos = comm.all_gather_json(payload)
        try:
            _raise_if_failed(
                infos,
                f"save of {job.tag!r} to {job.root}",
                comm,
                cleanup=job.tmp,
                exc=AsyncSaveError if job.future is not None else CheckpointError,
            )
        except CheckpointError:
            job.state = SaveState.FAILED
            raise
        job.state = SaveState.WRITTEN
        error = None
        if comm.rank == 0:
            try:
                m = _manifest(job, infos, comm.world)
                write_manifest(os.path.join(job.tmp, MANIFEST), m)
                publish(job.root, job.tmp, job.tag)
                if job.update_latest:
                    write_latest(job.root, job.tag)
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
                remove_tree(job.tmp)
        error = comm.broadcast_json(error)
        if error is not None:
            job.state = SaveState.FAILED
            raise CheckpointError(
                f"save of {job.tag!r} to {job.root}: rank 0 could not commit: {error}"
            )
        job.state = SaveState.COMMITTED


def _raise_if_failed(
    infos: list[dict],
    what: str,
    comm: Comm,
    *,
    cleanup: str | None,
    exc: type[CheckpointError] = CheckpointError,
) -> None:
    """Raise `exc` on every rank if any rank reported an error in `infos` (identical on all).

    `infos` comes from the all-gather that follows every rank's writes, so no writer of any rank
    can still be creating files: rank 0 removes `cleanup` then, and the other ranks raise only
    after it has (one more collective), so a failed save leaves nothing behind by the time any
    rank sees the exception.
    """
    errors = [(r, i["error"]) for r, i in enumerate(infos) if i.get("error")]
    if not errors:
        return
    lines = "\n".join(f"  rank {r}: {e}" for r, e in errors)
    if cleanup is not None:
        left = remove_tree(cleanup) if comm.rank == 0 else None
        left = comm.broadcast_json(left)
        if left is not None:
            lines += f"\n  (rank 0 could not remove the temporary directory {cleanup}: {left})"
    raise exc(f"{what} failed on {len(errors)} rank(s); nothing was committed:\n{lines}")


def remove_tree(path: str) -> str | None:
    """Delete `path` and everything under it; None once it is gone, else why it is not.

    shutil.rmtree(ignore_errors=True) gives up silently when an entry appears while it runs
    (the final rmdir meets ENOTEMPTY), so retry until the directory is really gone.
    """
    why = None
    for _ in range(_REMOVE_TRIES):
        if not os.path.lexists(path):
            return None
        try:
            shutil.rmtree(path)
        except FileNotFoundError:
            continue
        except OSError as e:
            why = f"{type(e).__name__}: {e}"
    return None if not os.path.lexists(path) else why or "entries kept appearing"


def _sources(
    frags: list[FragmentLike], pieces: list[Piece], *, to_cpu: bool = True
) -> list[torch.Tensor]:
    """The 1-D tensor of each piece: a view into its fragment (a CPU copy only if needed)."""
    out = []
    for p in pieces:
        f = frags[p.index]
        t = f.tensor.detach()[p.offset - f.offset : p.offset - f.offset + p.numel]
        if to_cpu and t.device.type != "cpu":
            t = t.cpu()
        out.append(t.contiguous())
    return out


def _file_name(rank: int) -> str:
    return f"rank-{rank:05d}.safetensors"


def _write_rank_file(
    tmp: str, rank: int, pieces: list[Piece], data: list[torch.Tensor], hashed: bool = True
) -> dict:
    """Write this rank's pieces to one safetensors file; return its index for the manifest."""
    if not pieces:
        return {"file": None, "size": 0, "header_hash": None, "records": []}
    name = _file_name(rank)
    entries = [
        (f"{p.name}@{p.offset}", to_st(t.dtype), p.numel, t.element_size())
        for p, t in zip(pieces, data)
    ]
    header, placed = layout(entries)
    size, digests, header_hash = write_file(
        os.path.join(tmp, name), placed, header, data, hashes=hashed
    )
    records = [
        {
            "name": p.name,
            **asdict(
                FragmentRecord(name, e.key, p.offset, p.numel, e.byte_start, e.nbytes, sha, chunks)
            ),
        }
        for p, e, (sha, chunks) in zip(pieces, placed, digests)
    ]
    return {"file": name, "size": size, "header_hash": header_hash, "records": records}


def _manifest(job: _Job, infos: list[dict], world: int) -> Manifest:
    tensors: dict[str, TensorRecord] = {}
    files: dict[str, int] = {}
    headers: dict[str, str] = {}
    for info in infos:
        if info.get("file"):
            files[info["file"]] = info["size"]
            headers[info["file"]] = info["header_hash"]
        for rec in info["records"]:
            rec = dict(rec)
            name = rec.pop("name")
            tensors.setdefault(name, TensorRecord([], "", [])).fragments.append(
                FragmentRecord(**rec)
            )
    for name in job.shapes:  # zero-element tensors have no pieces but still belong in the manifest
        tensors.setdefault(name, TensorRecord([], "", []))
    for name, t in tensors.items():
        t.shape, t.dtype = list(job.shapes[name][0]), job.shapes[name][1]
        t.fragments.sort(key=lambda r: r.offset)
    return Manifest(
        tag=job.tag,
        world_size=world,
        created_ns=time.time_ns(),
        files=files,
        tensors=tensors,
        client_state=job.client_state,
        rank_states={
            str(r): i["rank_state"] for r, i in enumerate(infos) if i.get("rank_state") is not None
        },
        headers=headers,
    )


_default_saver = Saver()


def default_saver() -> Saver:
    return _default_saver


def set_default_saver(saver: Saver) -> Saver:
    """Swap the saver behind ds_ckpt.save/finalize (tests); returns the previous one."""
    global _default_saver
    prev, _default_saver = _default_saver, saver
    return prev


def save(
    dir: str | os.PathLike,
    tag: str,
    fragments: list[FragmentLike],
    client_state: Any = None,
    *,
    group: Any = None,
    async_: bool = False,
    rank_state: Any = None,
    update_latest: bool = True,
    hashes: bool = True,
) -> SaveHandle:
    """Save this rank's fragments as checkpoint `tag` under `dir` (collective over `group`).

    Each rank passes the fragments it holds; replicated ranges are written once. `client_state`
    (rank 0's is kept) and `rank_state` (kept per rank) must be JSON-encodable (see encode()).
    Every stored piece always gets an XXH3-64 per 1 MiB chunk, and the manifest one of its own
    bytes, which every load checks; hashes=False skips only the optional SHA-256 (checked by
    load(verify_hashes=True) and `ds-ckpt verify`), which is CPU-bound and can cost more than
    the disk on a busy host. With async_=True the data is
    snapshotted to CPU memory, written in the background, and
    committed by the next save() or by finalize().
    """
    return _default_saver.save(
        dir,
        tag,
        fragments,
        client_state,
        group=group,
        async_=async_,
        rank_state=rank_state,
        update_latest=update_latest,
        hashes=hashes,
    )


def finalize() -> None:
    """Wait for and commit the pending async save (collective); raises if any rank failed."""
    _default_saver.finalize()
