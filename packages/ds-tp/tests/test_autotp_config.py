"""Tier 1: partition_config parsing and validation, presets, shard ranges (no process group)."""

from __future__ import annotations

import pytest
import torch

import ds_tp


def test_partition_config_from_deepspeed_dict():
    cfg = ds_tp.AutoTPConfig.from_dict(
        {
            "use_default_specs": False,
            "layer_specs": [
                {"patterns": [r".*\.o_proj\.weight$"], "partition_type": "row"},
                {
                    "patterns": [r".*\.gate_up_proj\.weight$"],
                    "partition_type": "column",
                    "shape": [2, -1],
                    "partition_dim": 0,
                },
                {"patterns": [r".*\.qkv_proj\.weight$"], "shape": [[64, 16, 16], -1]},
            ],
        }  # fmt: skip
    )
    assert cfg.use_default_specs is False
    row, gate_up, qkv = cfg.layer_specs
    assert row.partition_type is ds_tp.PartitionType.ROW and row.get_partition_dim() == 1
    assert gate_up.sub_sizes(48, "x") == (24, 24)
    assert qkv.partition_type is ds_tp.PartitionType.COLUMN and qkv.sub_sizes(96, "x") == (
        64,
        16,
        16,
    )
    assert cfg.find_matching_spec("model.layers.3.self_attn.o_proj.weight") is row
    assert cfg.find_matching_spec("model.layers.3.self_attn.o_proj.bias") is None


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"layer_specs": [{"patterns": ["x"], "partition": "row"}]}, r"layer_specs\[0\]: unknown keys \['partition'\]"),
        ({"layer_specs": [{"patterns": ["x"], "partition_type": "diagonal"}]}, "not one of 'column', 'row', 'skip'"),
        ({"layer_specs": [{"partition_type": "row"}]}, "'patterns'.*required"),
        ({"layer_specs": [{"patterns": ["("]}]}, "is not a regex"),
        ({"layer_specs": [{"patterns": ["x"], "shape": [2, -1], "partition_dim": 2}]}, "partition_dim 2 is out of range"),
        ({"layer_specs": [{"patterns": ["x"], "shape": [-1, [2, 2]], "partition_dim": 0}]}, "only at partition_dim 0"),
        ({"strict": True}, r"unknown keys \['strict'\]"),
    ],
)  # fmt: skip
def test_bad_partition_config_is_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        ds_tp.AutoTPConfig.from_dict(bad)


def test_presets_and_merge():
    for name in ("llama", "qwen2", "mixtral", "phi3", "LLAMA"):
        assert ds_tp.preset_config(name).layer_specs
    with pytest.raises(ValueError, match="preset_model 'gpt9' is not a preset"):
        ds_tp.preset_config("gpt9")
    merged = ds_tp.resolve_partition_config(
        {"layer_specs": [{"patterns": [r".*\.o_proj\.weight$"], "partition_type": "skip"}]}, "llama"
    )
    # the custom spec comes first and wins; the preset's follow
    assert merged.find_matching_spec("m.self_attn.o_proj.weight").partition_type.value == "skip"
    assert merged.find_matching_spec("m.self_attn.q_proj.weight").partition_type.value == "column"
    replaced = ds_tp.resolve_partition_config(
        {"use_default_specs": False, "layer_specs": [{"patterns": ["nothing"]}]}, "llama"
    )
    assert replaced.find_matching_spec("m.self_attn.q_proj.weight") is None
    with pytest.raises(ValueError, match="needs tensor_parallel.preset_model or"):
        ds_tp.resolve_partition_config(None, None)


@pytest.mark.parametrize("dim, subs", [(0, (8,)), (1, (6,)), (0, (4, 2, 2)), (1, (2, 4))])
def test_shard_ranges_cover_the_full_tensor(dim, subs):
    full = torch.arange(48.0).view(8, 6)
    world = 2
    seen = torch.zeros(48)
    for rank in range(world):
        shard = ds_tp.TPShard((8, 6), dim, subs, rank, world)
        local = shard.shard(full).reshape(-1)
        # any local sub-range maps onto the same elements of the full tensor
        for lo, n in ((0, local.numel()), (3, 7)):
            for g, lcl, k in shard.global_ranges(lo, n):
                assert torch.equal(full.view(-1)[g : g + k], local[lcl : lcl + k])
        for g, _, k in shard.global_ranges(0, local.numel()):
            seen[g : g + k] += 1
    assert torch.equal(seen, torch.ones(48))
    if dim == 0 and len(subs) == 1:
        assert len(ds_tp.TPShard((8, 6), 0, subs, 1, 2).global_ranges(0, 24)) == 1  # contiguous
