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
        assert ds_ckpt.load(tmp_path, "g", fragments(got, ranges)) == {"ok": True}
        for n, o, k in ranges:
            assert torch.equal(got[n].reshape(-1)[o : o + k].cpu(), ref[n].reshape(-1)[o : o + k])


def test_cuda_cast_on_load(tmp_path):
    w = torch.randn(1000, device="cuda")
    ds_ckpt.save(tmp_path, "g", [ds_ckpt.Fragment.whole("w", w)])
    out = torch.zeros(1000, device="cuda", dtype=torch.bfloat16)
    ds_ckpt.load(tmp_path, "g", [ds_ckpt.Fragment.whole("w", out)], cast=True)
    assert torch.equal(out, w.to(torch.bfloat16))
