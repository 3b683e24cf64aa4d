"""Tier 1-2: corruption is detected by default (chunk, header and manifest checksums).

The main test saves a small checkpoint with two real gloo ranks (two data files), then flips
one random byte of one random file of the tag directory 200 times (fixed seed) and requires a
default load, a resharded load and consolidate to fail every time, naming the file.
"""

from __future__ import annotations

import json
import logging
import os
import random

import pytest
import torch
from ckpt_layouts import flat_ranges, fragments, make_state, zeros_like_state

import ds_ckpt
from ds_ckpt import Fragment
from ds_ckpt._cli import main
from ds_ckpt._consolidate import consolidate
from ds_comm.testing import run_distributed

TRIALS = 200


def _state():
    state = make_state()
    # a parameter of two 1 MiB checksum chunks (and its Adam moments), split across the two ranks'
    # files mid-chunk
    g = torch.Generator().manual_seed(3)
    state["big"] = torch.randn(300_000, generator=g)
    state["optimizer.exp_avg.big"] = torch.randn(300_000, generator=g)
    state["optimizer.exp_avg_sq.big"] = torch.rand(300_000, generator=g)
    state["optimizer.step.big"] = torch.tensor([7], dtype=torch.int64)
    return state


def _save_two_ranks(root: str) -> None:
    import torch.distributed as dist

    state = _state()
    rank, world = dist.get_rank(), dist.get_world_size()
    ds_ckpt.save(
        root,
        "step7",
        fragments(state, flat_ranges(state, world, rank, uneven=True)),
        {"step": 7, "lr": 1e-3, "note": "x" * 40},
        rank_state={"rank": rank},
    )


def _load_all(root, got):
    ds_ckpt.load(root, "step7", [Fragment.whole(n, t) for n, t in got.items()])
    return got


def _load_resharded(root, got, state):
    """Three partitions, as three ranks of another world size would load them."""
    for r in range(3):
        ds_ckpt.load(root, "step7", fragments(got, flat_ranges(state, 3, r)))


def test_one_flipped_byte_anywhere_is_detected_200_trials(tmp_path):
    root = tmp_path / "c"
    run_distributed(_save_two_ranks, 2, args=(str(root),), timeout=120)
    state = _state()
    got = _load_all(root, zeros_like_state(state))  # intact: loads, bitwise
    assert all(torch.equal(got[n], state[n]) for n in state)
    tag_dir = root / "step7"
    files = sorted(p for p in tag_dir.iterdir() if p.is_file())
    assert [p.name for p in files] == [
        "manifest.json",
        "rank-00000.safetensors",
        "rank-00001.safetensors",
    ]
    originals = {p: p.read_bytes() for p in files}
    rng = random.Random(20261206)
    hit = {p.name: 0 for p in files}
    for trial in range(TRIALS):
        path = rng.choice(files)
        raw = bytearray(originals[path])
        pos = rng.randrange(len(raw))
        raw[pos] ^= rng.randrange(1, 256)
        path.write_bytes(bytes(raw))
        where = f"trial {trial}: byte {pos} of {path.name}"
        with pytest.raises(ds_ckpt.CheckpointCorruptError) as e:
            _load_all(root, got)
        assert str(path) in str(e.value), where
        with pytest.raises(ds_ckpt.CheckpointCorruptError, match=path.name):
            _load_resharded(root, got, state)
        with pytest.raises(ds_ckpt.CheckpointCorruptError, match=path.name):
            consolidate(root, tmp_path / "m.safetensors", tag="step7", include_optimizer=True)
        assert not (tmp_path / "m.safetensors").exists(), where
        path.write_bytes(originals[path])
        hit[path.name] += 1
    assert all(hit.values()), hit
    got = _load_all(root, zeros_like_state(state))
    assert all(torch.equal(got[n], state[n]) for n in state)


def _one(tmp_path, n=600_000):
    w = torch.randn(n, generator=torch.Generator().manual_seed(0))
    ds_ckpt.save(tmp_path, "t", [Fragment.whole("w", w)], {"world": 1})
    (f,) = (tmp_path / "t").glob("*.safetensors")
    m = json.loads((tmp_path / "t" / "manifest.json").read_text())
    return w, f, m["tensors"]["w"]["fragments"][0]["byte_start"]


def test_partial_loads_verify_exactly_the_chunks_they_read(tmp_path):
    """2.4 MB of fp32 = chunks [0, 1 MiB), [1, 2), [2, 2.4) MiB. A byte flipped in the second
    chunk fails every load whose range touches that chunk, even by one element, and no other."""
    w, f, start = _one(tmp_path)
    per_chunk = (1 << 20) // 4
    raw = bytearray(f.read_bytes())
    raw[start + (1 << 20) + 12345] ^= 0x40
    f.write_bytes(bytes(raw))

    def load(a, n):
        out = torch.zeros(n)
        ds_ckpt.load(tmp_path, "t", [Fragment("w", (600_000,), torch.float32, a, n, out)])
        assert torch.equal(out, w[a : a + n])

    load(0, per_chunk)  # chunk 0 only
    load(2 * per_chunk, 600_000 - 2 * per_chunk)  # chunk 2 only
    for a, n in [(per_chunk - 1, 2), (2 * per_chunk - 1, 1), (100, 2 * per_chunk), (0, 600_000)]:
        with pytest.raises(
            ds_ckpt.CheckpointCorruptError,
            match=rf"{f.name}: checksum \(xxh3_64\) mismatch in tensor 'w', elements "
            rf"\[{per_chunk}, {2 * per_chunk}\).*load an older tag",
        ):
            load(a, n)


@pytest.mark.parametrize(
    "edit",
    [
        lambda s: s.replace('"world": 1', '"world": 2'),  # client_state
        lambda s: s.replace('"world_size": 1', '"world_size": 2'),
        lambda s: s.replace('"tag": "t"', '"tag":  "t"'),  # whitespace only
        lambda s: s.replace('{"manifest_xxh3_64":"', '{"manifest_xxh3_65":"'),  # the signature key
        lambda s: s.replace('"format_version": 2', '"format_version": 1'),  # pose as unverified
    ],
)
def test_edited_manifest_is_detected(tmp_path, edit):
    _one(tmp_path, 10)
    p = tmp_path / "t" / "manifest.json"
    text = p.read_text()
    assert edit(text) != text
    p.write_text(edit(text))
    with pytest.raises(
        ds_ckpt.CheckpointCorruptError, match=r"manifest\.json: .*(checksum|manifest_xxh3_64)"
    ):
        ds_ckpt.load(tmp_path, "t", [Fragment.whole("w", torch.zeros(10))])
    assert main(["verify", str(tmp_path)]) == 1
    assert main(["inspect", str(tmp_path)]) == 1


def _as_version_1(tag_dir):
    """Rewrite a checkpoint's manifest as ds-ckpt 0.1.2 wrote it: no checksums, unsigned."""
    p = tag_dir / "manifest.json"
    m = json.loads(p.read_text())
    m.pop("manifest_xxh3_64")
    m.pop("checksum")
    m.pop("headers")
    m["format_version"] = 1
    for t in m["tensors"].values():
        for fr in t["fragments"]:
            fr.pop("chunk_hashes")
    p.write_text(json.dumps(m, indent=1))


def test_version_1_checkpoint_loads_with_one_unverified_log_line(tmp_path, caplog):
    w, f, start = _one(tmp_path)
    _as_version_1(tmp_path / "t")
    out = torch.zeros(600_000)
    with caplog.at_level(logging.WARNING, logger="ds_ckpt"):
        assert ds_ckpt.load(tmp_path, "t", [Fragment.whole("w", out)]) == {"world": 1}
    assert torch.equal(out, w)
    lines = [r.getMessage() for r in caplog.records if r.name == "ds_ckpt"]
    assert len(lines) == 1 and "without checksums, so this load is UNVERIFIED" in lines[0], lines
    assert str(tmp_path / "t") in lines[0]
    # its SHA-256 (saved by default) still catches a flipped byte when asked for
    raw = bytearray(f.read_bytes())
    raw[start + 5] ^= 1
    f.write_bytes(bytes(raw))
    with pytest.raises(ds_ckpt.CheckpointCorruptError, match="SHA-256 mismatch"):
        ds_ckpt.load(tmp_path, "t", [Fragment.whole("w", out)], verify_hashes=True)
    assert main(["verify", str(tmp_path)]) == 1
    out2 = tmp_path / "m.safetensors"
    consolidate(tmp_path, out2)  # unverified, like load: consolidate reads version 1 too
    assert out2.exists()


def test_consolidate_to_missing_directory_is_a_clean_error(tmp_path, capsys):
    _one(tmp_path, 10)
    missing = tmp_path / "nope" / "model.safetensors"
    assert main(["consolidate", str(tmp_path), "--out", str(missing)]) == 1
    err = capsys.readouterr().err
    assert "ds-ckpt consolidate: error:" in err and "does not exist" in err
    assert str(tmp_path / "nope") in err and "Traceback" not in err
    assert main(["consolidate", str(tmp_path), "--out", str(tmp_path)]) == 1
    assert "is a directory" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "nope")
