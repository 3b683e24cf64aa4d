"""Tier 1: `latest` fallback, corruption detection, overwrite, stale temp dirs."""

from __future__ import annotations

import json
import os

import pytest
import torch

import ds_ckpt
import ds_ckpt._load
from ds_ckpt import Fragment


def _save(root, tag, value):
    ds_ckpt.save(
        root,
        tag,
        [
            Fragment.whole("w", torch.full((64,), float(value))),
            Fragment.whole("b", torch.full((3,), float(value))),
        ],
        {"v": value},
    )


def _load_w(root, tag=None, **kw):
    out = torch.zeros(64)
    cs = ds_ckpt.load(root, tag, [Fragment.whole("w", out)], **kw)
    return cs["v"], out


@pytest.mark.parametrize("content", [b"", b"step", b"\xff\xfe garbage", b"../etc", b"st"])
def test_bad_latest_falls_back_to_newest_complete_tag(tmp_path, content):
    _save(tmp_path, "step1", 1)
    _save(tmp_path, "step2", 2)
    (tmp_path / "latest").write_bytes(content)
    with pytest.warns(RuntimeWarning, match="falling back to the newest complete checkpoint"):
        v, out = _load_w(tmp_path)
    assert v == 2 and torch.equal(out, torch.full((64,), 2.0))


def test_missing_latest_and_half_written_tag_fall_back(tmp_path):
    _save(tmp_path, "step1", 1)
    _save(tmp_path, "step2", 2)
    os.remove(tmp_path / "latest")
    os.remove(tmp_path / "step2" / "manifest.json")  # as if the rename had not happened
    with pytest.warns(RuntimeWarning, match="does not exist"):
        assert _load_w(tmp_path)[0] == 1


def test_latest_names_a_missing_tag(tmp_path):
    _save(tmp_path, "step1", 1)
    (tmp_path / "latest").write_text("step9\n")
    with pytest.warns(RuntimeWarning, match="names tag 'step9'"):
        assert _load_w(tmp_path)[0] == 1


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ds_ckpt.CheckpointNotFoundError, match="no complete checkpoint"):
        _load_w(tmp_path)
    _save(tmp_path, "step1", 1)
    with pytest.raises(ds_ckpt.CheckpointNotFoundError, match=r"'nope' does not exist.*step1"):
        _load_w(tmp_path, "nope")


def _data_file(root, tag):
    (f,) = (root / tag).glob("*.safetensors")
    return f


def test_flipped_byte_is_caught_by_default_and_names_the_file(tmp_path, monkeypatch):
    _save(tmp_path, "step0", 0)
    _save(tmp_path, "step1", 1)
    f = _data_file(tmp_path, "step1")
    raw = bytearray(f.read_bytes())
    m = json.loads((tmp_path / "step1" / "manifest.json").read_text())
    pos = m["tensors"]["w"]["fragments"][0]["byte_start"] + 37
    raw[pos] ^= 0x01
    f.write_bytes(bytes(raw))
    with pytest.raises(
        ds_ckpt.CheckpointCorruptError,
        match=rf"{f.name}: checksum \(xxh3_64\) mismatch in tensor 'w', elements \[0, 64\)"
        r".*load an older tag.*other complete tags.*\['step0'\]",
    ):
        _load_w(tmp_path)
    # the opt-in SHA-256 catches it on its own too (the chunk checksums switched off)
    monkeypatch.setattr(ds_ckpt._load, "_VERIFY_CHECKSUMS", False)
    with pytest.raises(ds_ckpt.CheckpointCorruptError, match=rf"{f.name}: SHA-256 mismatch.*'w'"):
        _load_w(tmp_path, verify_hashes=True)
    from ds_ckpt._cli import main

    assert main(["verify", str(tmp_path), "--no-hashes"]) == 1
    assert main(["verify", str(tmp_path)]) == 1


def test_deleted_file_is_an_error_naming_it(tmp_path):
    _save(tmp_path, "step1", 1)
    f = _data_file(tmp_path, "step1")
    f.unlink()
    with pytest.raises(ds_ckpt.CheckpointCorruptError, match=rf"{f.name}: file is missing"):
        _load_w(tmp_path)


def test_truncated_file_is_a_size_error(tmp_path):
    _save(tmp_path, "step1", 1)
    f = _data_file(tmp_path, "step1")
    f.write_bytes(f.read_bytes()[:-5])
    with pytest.raises(ds_ckpt.CheckpointCorruptError, match=rf"{f.name}: size .* truncated"):
        _load_w(tmp_path)


def test_garbage_manifest_is_an_error_naming_it(tmp_path):
    _save(tmp_path, "step1", 1)
    (tmp_path / "step1" / "manifest.json").write_text('{"format": "ds-ckpt", "tensors": 3')
    with pytest.raises(ds_ckpt.CheckpointCorruptError, match=r"manifest\.json: not valid JSON"):
        _load_w(tmp_path, "step1")


def test_overwriting_a_tag_replaces_it(tmp_path):
    _save(tmp_path, "step1", 1)
    _save(tmp_path, "step1", 5)
    assert _load_w(tmp_path)[0] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step1"]


def test_stale_temp_dirs_are_ignored_and_cleaned(tmp_path):
    _save(tmp_path, "step1", 1)
    stale = tmp_path / ".tmp-step2-abc"
    stale.mkdir()
    (stale / "rank-00000.safetensors").write_bytes(b"partial")
    assert ds_ckpt.complete_tags(tmp_path)[-1][1] == "step1"
    assert _load_w(tmp_path)[0] == 1
    _save(tmp_path, "step2", 2)
    assert not stale.exists()


def test_update_latest_false_keeps_pointer(tmp_path):
    _save(tmp_path, "step1", 1)
    ds_ckpt.save(
        tmp_path,
        "best",
        [Fragment.whole("w", torch.zeros(64)), Fragment.whole("b", torch.zeros(3))],
        {"v": 0},
        update_latest=False,
    )
    assert _load_w(tmp_path)[0] == 1 and _load_w(tmp_path, "best")[0] == 0


def test_hashes_false_skips_sha256_but_keeps_size_checks(tmp_path):
    ds_ckpt.save(tmp_path, "t", [Fragment.whole("w", torch.ones(64))], {"v": 1}, hashes=False)
    m = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert m["tensors"]["w"]["fragments"][0]["sha256"] is None
    assert _load_w(tmp_path)[0] == 1
    with pytest.raises(ds_ckpt.CheckpointCorruptError, match="saved without hashes"):
        _load_w(tmp_path, verify_hashes=True)
    from ds_ckpt._cli import main

    assert main(["verify", str(tmp_path)]) == 0
    f = _data_file(tmp_path, "t")
    f.write_bytes(f.read_bytes()[:-1])
    assert main(["verify", str(tmp_path)]) == 1
