"""Tier 1: async save: snapshot semantics, deferred commit, failure propagation."""

from __future__ import annotations

import errno
import os
import shutil

import pytest
import torch

import ds_ckpt
import ds_ckpt._save as save_mod
from ds_ckpt import Fragment, SaveState


@pytest.fixture
def saver():
    s = ds_ckpt.Saver()
    prev = ds_ckpt.set_default_saver(s)
    yield s
    ds_ckpt.set_default_saver(prev)
    s._pending = None  # a test that left a failed save behind must not leak it
    s.close()


def test_async_snapshot_then_commit_at_finalize(tmp_path, saver):
    w = torch.arange(1000, dtype=torch.float32)
    h = ds_ckpt.save(tmp_path, "a", [Fragment.whole("w", w)], {"v": 1}, async_=True)
    w.add_(1)  # training goes on: the checkpoint must hold the values at save() time
    assert h.state is SaveState.WRITING
    assert not (tmp_path / "a").exists()  # committed only by finalize / next save
    ds_ckpt.finalize()
    assert h.state is SaveState.COMMITTED
    assert torch.equal(ds_ckpt.load_tensor(tmp_path, "w"), torch.arange(1000.0))


def test_next_save_commits_the_previous(tmp_path, saver):
    w = torch.ones(10)
    ds_ckpt.save(tmp_path, "a", [Fragment.whole("w", w)], async_=True)
    ds_ckpt.save(tmp_path, "b", [Fragment.whole("w", w * 2)], async_=True)
    assert (tmp_path / "a").is_dir() and not (tmp_path / "b").exists()
    ds_ckpt.wait()
    assert ds_ckpt.resolve_tag(str(tmp_path), None) == "b"
    assert [t for _, t in ds_ckpt.complete_tags(tmp_path)] == ["a", "b"]


def test_writer_failure_raised_at_finalize_and_nothing_committed(tmp_path, saver, monkeypatch):
    ds_ckpt.save(tmp_path, "good", [Fragment.whole("w", torch.ones(4))])

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(save_mod, "_write_rank_file", broken)
    h = ds_ckpt.save(tmp_path, "bad", [Fragment.whole("w", torch.zeros(4))], async_=True)
    with pytest.raises(ds_ckpt.AsyncSaveError, match=r"rank 0: OSError.*No space left"):
        ds_ckpt.finalize()
    assert h.state is SaveState.FAILED
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good", "latest"]
    assert torch.equal(ds_ckpt.load_tensor(tmp_path, "w"), torch.ones(4))


def test_writer_failure_raised_at_next_save(tmp_path, saver, monkeypatch):
    monkeypatch.setattr(
        save_mod,
        "_write_rank_file",
        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk gone")),
    )
    ds_ckpt.save(tmp_path, "bad", [Fragment.whole("w", torch.zeros(4))], async_=True)
    monkeypatch.undo()
    with pytest.raises(ds_ckpt.AsyncSaveError, match="disk gone"):
        ds_ckpt.save(tmp_path, "next", [Fragment.whole("w", torch.zeros(4))])
    ds_ckpt.save(tmp_path, "next", [Fragment.whole("w", torch.zeros(4))])  # recovered
    assert ds_ckpt.resolve_tag(str(tmp_path), None) == "next"


def test_snapshot_buffer_is_reused(tmp_path, saver):
    w = torch.randn(4096)
    ds_ckpt.save(tmp_path, "a", [Fragment.whole("w", w)], async_=True)
    first = saver._staging.data_ptr()
    ds_ckpt.save(tmp_path, "b", [Fragment.whole("w", w)], async_=True)
    ds_ckpt.finalize()
    assert saver._staging.data_ptr() == first
    assert torch.equal(ds_ckpt.load_tensor(tmp_path, "w", "b"), w)


def test_failed_save_cleanup_retries_when_entries_appear(tmp_path, monkeypatch):
    """rmtree(ignore_errors=True) silently keeps a directory into which an entry appeared while
    it ran; the cleanup of a failed save retries until the directory is gone."""
    d = tmp_path / ".tmp-x-0"
    d.mkdir()
    (d / "rank-00000.safetensors").write_bytes(b"x")
    real, calls = shutil.rmtree, []

    def racing_rmtree(path, *a, **k):
        calls.append(path)
        if len(calls) == 1:  # a late writer creates a file while the first pass runs
            real(path)
            os.mkdir(path)
            (d / "late").write_bytes(b"y")
            raise OSError(errno.ENOTEMPTY, "Directory not empty", path)
        real(path, *a, **k)

    monkeypatch.setattr(save_mod.shutil, "rmtree", racing_rmtree)
    assert save_mod.remove_tree(str(d)) is None
    assert not d.exists() and len(calls) == 2
    assert save_mod.remove_tree(str(d)) is None  # already gone: nothing to do
