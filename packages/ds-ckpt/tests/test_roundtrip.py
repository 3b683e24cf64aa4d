"""Tier 1: save/load in one process: exactness, formats, resharding math, errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
from ckpt_layouts import (
    assert_ranges_equal,
    flat_ranges,
    fragments,
    make_state,
    per_param_ranges,
    pipeline_ranges,
    replicated_ranges,
    zeros_like_state,
)
from safetensors import safe_open

import ds_ckpt
from ds_ckpt import Fragment


def _save_layout(tmp_path, tag, state, per_rank_ranges):
    """One process stands in for all ranks: the union of their fragments, copies included."""
    frs = [f for ranges in per_rank_ranges for f in fragments(state, ranges)]
    ds_ckpt.save(tmp_path, tag, frs, {"layout": len(per_rank_ranges)})


def _load_layout(tmp_path, state, per_rank_ranges, tag=None):
    for ranges in per_rank_ranges:
        got = zeros_like_state(state)
        cs = ds_ckpt.load(tmp_path, tag, fragments(got, ranges))
        assert_ranges_equal(got, state, ranges)
    return cs


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        torch.bfloat16,
        torch.float16,
        torch.float64,
        torch.int64,
        torch.int32,
        torch.int8,
        torch.uint8,
        torch.bool,
    ],
)
def test_round_trip_exact_every_dtype(tmp_path, dtype):
    g = torch.Generator().manual_seed(1)
    t = (torch.randn(7, 5, generator=g) * 50).to(dtype)
    scalar = torch.tensor(3, dtype=dtype)
    empty = torch.empty(0, 4, dtype=dtype)
    ds_ckpt.save(
        tmp_path,
        "t",
        [Fragment.whole("t", t), Fragment.whole("s", scalar), Fragment.whole("e", empty)],
    )
    assert torch.equal(ds_ckpt.load_tensor(tmp_path, "t"), t)
    assert torch.equal(ds_ckpt.load_tensor(tmp_path, "s"), scalar)
    assert ds_ckpt.load_tensor(tmp_path, "e").shape == (0, 4)


def test_files_are_plain_safetensors_and_manifest_is_json(tmp_path):
    state = make_state()
    _save_layout(tmp_path, "step1", state, [replicated_ranges(state)])
    m = json.loads((tmp_path / "step1" / "manifest.json").read_text())
    assert m["format"] == "ds-ckpt" and m["format_version"] == 2
    rec = m["tensors"]["layers.0.norm.weight"]
    assert rec["dtype"] == "BF16" and rec["shape"] == [12]
    fr = rec["fragments"][0]
    with safe_open(str(tmp_path / "step1" / fr["file"]), "pt") as f:
        assert torch.equal(f.get_tensor(fr["key"]), state["layers.0.norm.weight"])
    assert (tmp_path / "latest").read_text().strip() == "step1"
    assert sorted(os.listdir(tmp_path)) == ["latest", "step1"]  # no temp dirs left


def test_replicated_copies_are_stored_once(tmp_path):
    state = make_state()
    _save_layout(tmp_path, "a", state, [replicated_ranges(state)])
    _save_layout(tmp_path, "b", state, [replicated_ranges(state)] * 4)
    size = {t: sum(f.stat().st_size for f in (tmp_path / t).glob("*.safetensors")) for t in "ab"}
    assert size["a"] == size["b"]
    payload = sum(t.numel() * t.element_size() for t in state.values())
    (f,) = (tmp_path / "a").glob("*.safetensors")
    header = 8 + int.from_bytes(f.read_bytes()[:8], "little")
    assert size["a"] == payload + header


LAYOUTS = {
    "dp4-flat": lambda s: [flat_ranges(s, 4, r) for r in range(4)],
    "dp2-flat": lambda s: [flat_ranges(s, 2, r) for r in range(2)],
    "dp3-flat-uneven": lambda s: [flat_ranges(s, 3, r, uneven=True) for r in range(3)],
    "dp4-stage3": lambda s: [per_param_ranges(s, 4, r) for r in range(4)],
    "dp2-stage3": lambda s: [per_param_ranges(s, 2, r) for r in range(2)],
    "pp2": lambda s: [pipeline_ranges(s, 2, r) for r in range(2)],
    "pp3": lambda s: [pipeline_ranges(s, 3, r) for r in range(3)],
    "replicated": lambda s: [replicated_ranges(s)] * 2,
}
RESHARD = [
    ("dp4-flat", "dp2-flat"),
    ("dp2-flat", "dp4-flat"),
    ("dp2-flat", "dp3-flat-uneven"),
    ("dp4-flat", "dp3-flat-uneven"),
    ("dp4-stage3", "dp2-flat"),
    ("dp2-flat", "dp4-stage3"),
    ("dp4-stage3", "dp2-stage3"),
    ("pp2", "pp3"),
    ("pp3", "dp4-stage3"),
    ("dp3-flat-uneven", "replicated"),
    ("replicated", "dp4-stage3"),
]


@pytest.mark.parametrize(("src", "dst"), RESHARD)
def test_reshard_between_layouts(tmp_path, src, dst):
    state = make_state()
    _save_layout(tmp_path, "s", state, LAYOUTS[src](state))
    cs = _load_layout(tmp_path, state, LAYOUTS[dst](state))
    assert cs == {"layout": len(LAYOUTS[src](state))}


def test_layouts_cover_the_whole_state():
    state = make_state()
    for name, build in LAYOUTS.items():
        covered = {n: torch.zeros(t.numel(), dtype=torch.int32) for n, t in state.items()}
        for ranges in build(state):
            for n, o, k in ranges:
                covered[n][o : o + k] += 1
        assert all(c.min() >= 1 for c in covered.values()), name


def test_load_reads_only_the_needed_bytes(tmp_path, monkeypatch):
    """A partial load reads the wanted range widened to the stored piece's 1 MiB checksum chunks
    (to verify them), nothing more; with verification off (the benchmark's switch) exactly
    the wanted bytes."""
    import ds_ckpt._load as ld
    import ds_ckpt._stfile as stf

    big = torch.arange(1 << 22, dtype=torch.float32)  # 16 MiB: 16 chunks
    ds_ckpt.save(tmp_path, "t", [Fragment.whole("big", big)])
    seen = []
    real = os.preadv

    def spy(fd, bufs, off, *flags):
        n = real(fd, bufs, off, *flags)  # bytes read (a cache-only read may return fewer)
        # a verified span's one-byte cache-only probe of its first byte is not a read of data
        # (the span's first chunk is read in full next)
        if not (flags and sum(len(b) for b in bufs) == 1):
            seen.append((off, n))
        return n

    monkeypatch.setattr(stf.os, "preadv", spy)
    mib = 1 << 20
    for a, n, chunks in [(5000, 1000, 1), (mib // 4 - 10, 20, 2), (mib // 4, 3 * mib // 4, 3)]:
        seen.clear()
        out = torch.zeros(n)
        ds_ckpt.load(tmp_path, "t", [Fragment("big", (1 << 22,), torch.float32, a, n, out)])
        assert torch.equal(out, big[a : a + n])
        reads = [(o, k) for o, k in seen if k != 8 and o >= 4096]  # not the header reads
        assert sum(k for _, k in reads) == chunks * mib, (a, n, reads)
        assert all((o - 4096) % mib == 0 for o, _ in reads)
    monkeypatch.setattr(ld, "_VERIFY_CHECKSUMS", False)
    seen.clear()
    out = torch.zeros(1000)
    ds_ckpt.load(tmp_path, "t", [Fragment("big", (1 << 22,), torch.float32, 5000, 1000, out)])
    assert torch.equal(out, big[5000:6000])
    assert sum(k for o, k in seen if k != 8 and o >= 4096) == 4000


def test_cast_on_load_only_when_asked(tmp_path):
    w = torch.randn(4, 4)
    ds_ckpt.save(tmp_path, "t", [Fragment.whole("w", w)])
    out = torch.zeros(4, 4, dtype=torch.bfloat16)
    with pytest.raises(ds_ckpt.CheckpointMismatchError, match="pass cast=True"):
        ds_ckpt.load(tmp_path, "t", [Fragment.whole("w", out)])
    ds_ckpt.load(tmp_path, "t", [Fragment.whole("w", out)], cast=True)
    assert torch.equal(out, w.to(torch.bfloat16))


def test_non_contiguous_destination(tmp_path):
    w = torch.randn(6, 4)
    ds_ckpt.save(tmp_path, "t", [Fragment.whole("w", w)])
    out = torch.zeros(4, 6).t()  # a transposed view: flat slices of it are not contiguous
    col = torch.zeros(6, 2)[:, 0]
    ds_ckpt.load(tmp_path, "t", [Fragment("w", (6, 4), torch.float32, 4, 6, col)])
    assert torch.equal(col, w.reshape(-1)[4:10])
    del out


def test_mismatch_errors_name_the_tensor(tmp_path):
    ds_ckpt.save(tmp_path, "t", [Fragment.whole("layers.0.w", torch.zeros(3, 3))])
    with pytest.raises(ds_ckpt.CheckpointMismatchError, match=r"'layers\.0\.v'.*layers\.0\.w"):
        ds_ckpt.load(tmp_path, "t", [Fragment.whole("layers.0.v", torch.zeros(3, 3))])
    with pytest.raises(ds_ckpt.CheckpointMismatchError, match=r"holds shape \[3, 3\]"):
        ds_ckpt.load(tmp_path, "t", [Fragment.whole("layers.0.w", torch.zeros(9))])


def test_bad_fragments_fail_before_writing(tmp_path):
    with pytest.raises(ds_ckpt.CheckpointError, match=r"1-D with numel=4"):
        ds_ckpt.save(tmp_path, "t", [Fragment("w", (4,), torch.float32, 0, 4, torch.zeros(2, 2))])
    with pytest.raises(ds_ckpt.CheckpointError, match="outside the global tensor"):
        ds_ckpt.save(tmp_path, "t", [Fragment("w", (4,), torch.float32, 2, 4, torch.zeros(4))])
    with pytest.raises(ds_ckpt.CheckpointError, match="held by no rank"):
        ds_ckpt.save(tmp_path, "t", [Fragment("w", (4,), torch.float32, 0, 2, torch.zeros(2))])
    with pytest.raises(ds_ckpt.CheckpointError, match="not usable as a directory name"):
        ds_ckpt.save(tmp_path, "../x", [])
    assert not any(p.name != "latest" for p in tmp_path.iterdir() if p.name.startswith("."))
    assert not (tmp_path / "t").exists()


def test_client_state_json_round_trip(tmp_path):
    import random

    random.seed(3)
    torch.manual_seed(4)
    sched = torch.optim.lr_scheduler.StepLR(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), step_size=2
    )
    sched.step()
    cs = {
        "rng": ds_ckpt.capture_rng_state(),
        "sched": sched.state_dict(),
        "ints": {1: (2, 3)},
        "blob": b"\x00\x01",
        "step": 5,
    }
    ds_ckpt.save(tmp_path, "t", [], cs, rank_state={"rank": 0, "rng": torch.get_rng_state()})
    want = (random.random(), torch.rand(3))
    got = ds_ckpt.load(tmp_path, "t")
    ds_ckpt.restore_rng_state(got["rng"])
    assert (random.random(), torch.rand(3))[0] == want[0]
    ds_ckpt.restore_rng_state(got["rng"])
    random.random()
    assert torch.equal(torch.rand(3), want[1])
    assert got["sched"] == json.loads(json.dumps(sched.state_dict()))
    assert got["ints"] == {1: (2, 3)} and got["blob"] == b"\x00\x01" and got["step"] == 5
    rs = ds_ckpt.load_rank_state(tmp_path, "t", 0)
    assert rs["rank"] == 0 and rs["rng"].dtype == torch.uint8
    with pytest.raises(ds_ckpt.CheckpointError, match=r"client_state\.bad: object"):
        ds_ckpt.save(tmp_path, "u", [], {"bad": object()})


def test_odirect_write_path(tmp_path, monkeypatch):
    """Large files bypass the page cache through aligned bounce buffers; tails are padded
    then truncated; large reads go through O_DIRECT too. Forced here with tiny blocks so every
    branch runs (several buffers in turn, unaligned ranges on both sides)."""
    import ds_ckpt._load as ld
    import ds_ckpt._stfile as stf

    calls = []
    real = stf._StreamWriter.__init__

    def spy(self, fd, total, *, direct, pinned):
        calls.append(direct)
        real(self, fd, total, direct=direct, pinned=pinned)

    monkeypatch.setattr(stf, "_DIRECT_MIN", 0)
    monkeypatch.setattr(ld, "_DIRECT_MIN", 0)
    monkeypatch.setattr(ld, "_DIRECT_READS", True)
    monkeypatch.setattr(ld, "_DIRECT_READ_MIN", 1)
    monkeypatch.setattr(ld, "_READ_CHUNK", 3 * 4096 + 100)
    monkeypatch.setattr(stf, "_DIRECT_BLOCK", 1 << 16)
    monkeypatch.setattr(stf._StreamWriter, "__init__", spy)
    ts = {f"w{i}": torch.randn(50_001 + i) for i in range(4)}
    ts["b"] = torch.randn(77).to(torch.bfloat16)
    ds_ckpt.save(tmp_path, "t", [Fragment.whole(n, t) for n, t in ts.items()])
    if not any(calls):
        pytest.skip(f"{tmp_path} does not support O_DIRECT")
    for n, t in ts.items():
        assert torch.equal(ds_ckpt.load_tensor(tmp_path, n, verify_hashes=True), t)
    (f,) = (tmp_path / "t").glob("*.safetensors")
    with safe_open(str(f), "pt") as h:
        assert torch.equal(h.get_tensor("b@0"), ts["b"])
