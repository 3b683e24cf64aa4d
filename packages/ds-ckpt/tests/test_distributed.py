"""Tier 2: real ranks (gloo): parallel writes, dedupe, the reshard matrix, async failures."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
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

import ds_ckpt
from ds_comm.testing import distributed_test

# What each rank of a layout holds; at load, rank r of the real world plays the layout's
# partitions p with p % world == r, so one run checks every target partition.
TARGETS = {
    "dp2-flat": lambda s: [flat_ranges(s, 2, r) for r in range(2)],
    "dp3-flat-uneven": lambda s: [flat_ranges(s, 3, r, uneven=True) for r in range(3)],
    "dp4-flat": lambda s: [flat_ranges(s, 4, r) for r in range(4)],
    "dp2-stage3": lambda s: [per_param_ranges(s, 2, r) for r in range(2)],
    "dp3-stage3": lambda s: [per_param_ranges(s, 3, r) for r in range(3)],
    "pp2": lambda s: [pipeline_ranges(s, 2, r) for r in range(2)],
    "pp3": lambda s: [pipeline_ranges(s, 3, r) for r in range(3)],
}


def _check_targets(root, tag, state, rank, world):
    for name, build in TARGETS.items():
        for p, ranges in enumerate(build(state)):
            if p % world != rank:
                continue
            got = zeros_like_state(state)
            cs = ds_ckpt.load(root, tag, fragments(got, ranges), verify_hashes=True)
            assert cs == {"world": world}, name
            try:
                assert_ranges_equal(got, state, ranges)
            except AssertionError as e:
                raise AssertionError(f"{tag} -> {name} partition {p}: {e}") from None


def _payload_bytes(tag_dir) -> int:
    return sum(
        os.path.getsize(tag_dir / f) - 8 - int.from_bytes((tag_dir / f).read_bytes()[:8], "little")
        for f in os.listdir(tag_dir)
        if f.endswith(".safetensors")
    )


@distributed_test(world_size=[2, 4], timeout=180)
def test_reshard_matrix(tmp_path, world_size):
    """Saved at world_size ranks in three source layouts, each loaded at every target layout.

    stage12: weights replicated on every rank (as ZeRO-1/2 keep them) plus fp32 master and
    moments partitioned as one flat buffer; stage3: every tensor partitioned on its own; pp:
    whole layers per pipeline stage (4 layers over world_size stages).
    """
    rank = dist.get_rank()
    state = make_state(layers=4)
    payload = sum(t.numel() * t.element_size() for t in state.values())
    weights = {n: t for n, t in state.items() if not n.startswith("optimizer.")}
    sources = {
        "stage12": replicated_ranges(weights) + flat_ranges(state, world_size, rank),
        "stage3": per_param_ranges(state, world_size, rank),
        "pp": pipeline_ranges(state, world_size, rank),
    }
    for tag, ranges in sources.items():
        ds_ckpt.save(tmp_path, tag, fragments(state, ranges), {"world": world_size})
        assert _payload_bytes(tmp_path / tag) == payload, "replicas must be stored once"
    assert len(os.listdir(tmp_path / "stage12")) == world_size + 1  # a file per rank + manifest
    for tag in sources:
        _check_targets(tmp_path, tag, state, rank, world_size)


@distributed_test(world_size=2, timeout=120)
def test_failure_on_one_rank_raises_on_all(tmp_path):
    """An async writer failing on rank 1 is raised at finalize on both ranks."""
    import ds_ckpt._save as save_mod

    rank = dist.get_rank()
    w = torch.full((100,), float(rank))
    frag = [ds_ckpt.Fragment.slice_of("w", torch.zeros(200), 0, 100)]
    frag[0].offset, frag[0].tensor = 100 * rank, w
    ds_ckpt.save(tmp_path, "good", frag, async_=True)
    if rank == 1:
        real = save_mod._write_rank_file

        def broken(tmp, *a, **k):
            # a writer that dies half-way leaves a partial file behind in the temp dir
            with open(os.path.join(tmp, "rank-00001.safetensors"), "wb") as f:
                f.write(b"partial")
            raise OSError(5, "Input/output error")

        save_mod._write_rank_file = broken
    ds_ckpt.save(tmp_path, "bad", frag, async_=True)  # commits "good" first
    if rank == 1:
        save_mod._write_rank_file = real
    with pytest.raises(ds_ckpt.AsyncSaveError, match=r"rank 1: OSError.*Input/output error"):
        ds_ckpt.finalize()
    # no barrier: no rank raises before rank 0 has removed the failed save's temp dir
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
    assert ds_ckpt.resolve_tag(str(tmp_path), None) == "good"
    dist.barrier()
    got = torch.zeros(200)
    ds_ckpt.load(tmp_path, None, [ds_ckpt.Fragment.whole("w", got)])
    assert torch.equal(got, torch.cat([torch.zeros(100), torch.ones(100)]))

    # Bad input on one rank: every rank raises (naming rank 1), nobody hangs in a collective.
    t = torch.zeros(4) if rank == 0 else torch.zeros(2, 2)  # rank 1's tensor is not 1-D
    f = ds_ckpt.Fragment("w", (4,), torch.float32, 0, 4, t)
    with pytest.raises(ds_ckpt.CheckpointError, match=r"rank 1: ValueError.*1-D"):
        ds_ckpt.save(tmp_path, "s", [f])
    assert not (tmp_path / "s").exists()
    # rank 0 had made the temp dir before rank 1's input was refused: it is gone too
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
