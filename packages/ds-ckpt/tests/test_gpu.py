"""Tier 3: device tensors: save from and load into CUDA fragments (sync and async)."""

from __future__ import annotations

import pytest
import torch
from ckpt_layouts import flat_ranges, fragments, make_state, zeros_like_state

import ds_ckpt

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("async_", [False, True])
def test_cuda_round_trip_and_reshard(tmp_path, async_):
    state = {n: t.cuda() for n, t in make_state().items()}
    frs = [f for r in range(4) for f in fragments(state, flat_ranges(state, 4, r))]
    ds_ckpt.save(tmp_path, "g", frs, {"ok": True}, async_=async_)
    if async_:
        for t in state.values():  # the snapshot was taken: changing the source is safe
            t.zero_() if t.dtype != torch.bool else None
        ds_ckpt.finalize()
    ref = make_state()
    for r in range(3):  # load at dp=3 (uneven) into device destinations
        got = {n: t.cuda() for n, t in zeros_like_state(ref).items()}
        ranges = flat_ranges(ref, 3, r, uneven=True)
        # verify_hashes: a sync save hashes device tensors piece by piece from its buffers
        assert ds_ckpt.load(tmp_path, "g", fragments(got, ranges), verify_hashes=True) == {
            "ok": True
        }
        for n, o, k in ranges:
            assert torch.equal(got[n].reshape(-1)[o : o + k].cpu(), ref[n].reshape(-1)[o : o + k])


def test_cuda_cast_on_load(tmp_path):
    w = torch.randn(1000, device="cuda")
    ds_ckpt.save(tmp_path, "g", [ds_ckpt.Fragment.whole("w", w)])
    out = torch.zeros(1000, device="cuda", dtype=torch.bfloat16)
    ds_ckpt.load(tmp_path, "g", [ds_ckpt.Fragment.whole("w", out)], cast=True)
    assert torch.equal(out, w.to(torch.bfloat16))


def test_cuda_save_streams_large_files(tmp_path, monkeypatch):
    """A sync save of device tensors bigger than the writer's buffers: several buffers in turn,
    hashes chained across them, O_DIRECT where the disk allows it."""
    import ds_ckpt._stfile as stf

    monkeypatch.setattr(stf, "_DIRECT_BLOCK", 1 << 20)
    monkeypatch.setattr(stf, "_DIRECT_MIN", 0)
    w = torch.randn(3_000_017, device="cuda")  # ~12 MB: a dozen 1 MiB buffers
    b = torch.randn(999, device="cuda").to(torch.bfloat16)
    ds_ckpt.save(tmp_path, "g", [ds_ckpt.Fragment.whole("w", w), ds_ckpt.Fragment.whole("b", b)])
    assert torch.equal(ds_ckpt.load_tensor(tmp_path, "w", verify_hashes=True), w.cpu())
    assert torch.equal(ds_ckpt.load_tensor(tmp_path, "b", verify_hashes=True), b.cpu())
    from ds_ckpt._cli import main

    # the chunk checksums, fed across buffer boundaries that are not chunk boundaries
    assert main(["verify", str(tmp_path), "--no-hashes"]) == 0
