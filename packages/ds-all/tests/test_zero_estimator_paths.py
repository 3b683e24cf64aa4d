"""``ds_all.runtime.zero.stage_1_and_2`` / ``stage3``: DeepSpeed's memory estimators, as
ds_zero's very objects."""

from __future__ import annotations

from torch import nn

import ds_zero
from ds_all.runtime.zero import stage3, stage_1_and_2


def test_names_are_ds_zero_objects():
    for name in ("estimate_zero2_model_states_mem_needs",
                 "estimate_zero2_model_states_mem_needs_all_cold",
                 "estimate_zero2_model_states_mem_needs_all_live"):  # fmt: skip
        assert getattr(stage_1_and_2, name) is getattr(ds_zero, name)
    for name in ("estimate_zero3_model_states_mem_needs",
                 "estimate_zero3_model_states_mem_needs_all_cold",
                 "estimate_zero3_model_states_mem_needs_all_live"):  # fmt: skip
        assert getattr(stage3, name) is getattr(ds_zero, name)
    # DeepSpeed's two model_to_params: a count at ZeRO 1/2, (count, largest layer) at ZeRO 3
    assert stage_1_and_2.model_to_params is ds_zero.zero2_model_to_params
    assert stage3.model_to_params is ds_zero.zero3_model_to_params


def test_a_deepspeed_script_prints_the_table(capsys):
    model = nn.Sequential(nn.Linear(1000, 4000), nn.Linear(4000, 1000))
    stage3.estimate_zero3_model_states_mem_needs_all_live(model, num_gpus_per_node=4, num_nodes=2)
    out = capsys.readouterr().out
    assert "HW: Setup with 2 nodes, 4 GPUs per node." in out
    assert out.count("offload_param=") == 6
    stage_1_and_2.estimate_zero2_model_states_mem_needs_all_live(model)
    assert "offload_optimizer=none" in capsys.readouterr().out
