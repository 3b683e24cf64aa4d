"""DeepSpeed's model-state memory estimators: its formulas, its tables, its parameter counts."""

from __future__ import annotations

import pytest
from torch import nn

import ds_zero

GIB = 2**30


def test_zero2_formulas():
    psi = 1_000_000_000
    # optimizer offloaded: 2 bytes a parameter on each device; the host max(4N, 16) x 1.5
    assert ds_zero.estimate_zero2_model_states_mem_needs(psi, 8, 1, True) == (48 * psi, 2 * psi)
    assert ds_zero.estimate_zero2_model_states_mem_needs(psi, 8, 2, True) == (96 * psi, 2 * psi)
    # not offloaded: 2 + 18 / N on each device; the host 4 x devices per node x 1.5
    cpu, gpu = ds_zero.estimate_zero2_model_states_mem_needs(psi, 4, 1, False, 1.0)
    assert (cpu, gpu) == (16 * psi, 2 * psi + int(18 * psi / 4))


def test_zero3_formulas():
    psi, layer = 3_000_000_000, 50_000_000
    est = ds_zero.estimate_zero3_model_states_mem_needs
    # parameters and optimizer on the host: only the largest layer gathered on a device
    assert est(psi, layer, 8, 2, True, True, True, 1.0) == (9 * psi, 4 * layer, 4 * layer)
    assert est(psi, layer, 8, 2, True, True, False, 1.0)[0] == 32 * psi  # max(4 x 8, 18 / 2)
    # the optimizer only: plus each device's 16-bit partition; 16 bytes on the host
    assert est(psi, layer, 8, 2, True, False, True, 1.0)[:2] == (8 * psi, 4 * layer + psi // 8)
    # nothing offloaded: 18 bytes per parameter over all devices
    cpu, gpu, _ = est(psi, layer, 8, 2, False, False, True, 1.5)
    assert (cpu, gpu) == (int(layer * 4 * 8 * 1.5), 4 * layer + int(18 * psi / 16))
    with pytest.raises(ValueError, match="num_gpus_per_node"):
        est(psi, layer, 0)


def test_tables_print_deepspeeds_rows(capsys):
    ds_zero.estimate_zero3_model_states_mem_needs_all_cold(
        total_params=2_700_000_000, largest_layer_params=143_000_000, num_gpus_per_node=8
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[:4] == [
        "Estimated memory needed for params, optim states and gradients for a:",
        "HW: Setup with 1 node, 8 GPUs per node.",
        "SW: Model with 2700M total params, 143M largest layer params.",
        "  per CPU  |  per GPU |   Options",
    ]
    cpu, gpu, _ = ds_zero.estimate_zero3_model_states_mem_needs(2_700_000_000, 143_000_000, 8)
    assert lines[4] == (
        f" {cpu / GIB:7.2f}GB | {gpu / GIB:6.2f}GB | "
        "offload_param=cpu , offload_optimizer=cpu , zero_init=1"
    )
    assert len(lines) == 10 and lines[-1].endswith(
        "offload_param=none, offload_optimizer=none, zero_init=0"
    )
    ds_zero.estimate_zero2_model_states_mem_needs_all_cold(2_700_000_000, num_gpus_per_node=1)
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "HW: Setup with 1 node, 1 GPU per node." and len(out) == 6
    assert out[4].endswith("| offload_optimizer=cpu ") and out[5].endswith(
        "| offload_optimizer=none"
    )


def test_live_counts_tied_and_partitioned_parameters_once_at_full_size(capsys):
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(100, 16)
            self.mid = nn.Linear(16, 32)
            self.head = nn.Linear(16, 100, bias=False)
            self.head.weight = self.emb.weight  # tied: one tensor

    model = Tied()
    total = 100 * 16 + 16 * 32 + 32
    assert ds_zero.zero2_model_to_params(model) == total
    assert ds_zero.zero3_model_to_params(model) == (total, 100 * 16)  # the embedding's own
    with ds_zero.Init():
        released = nn.Sequential(nn.Linear(10, 20), nn.Linear(20, 5))
    assert all(p.numel() == 0 for p in released.parameters())  # partitioned away
    assert ds_zero.zero3_model_to_params(released) == (10 * 20 + 20 + 20 * 5 + 5, 220)
    ds_zero.estimate_zero3_model_states_mem_needs_all_live(model, num_gpus_per_node=2)
    assert "SW: Model with 0M total params, 0M largest layer params." in capsys.readouterr().out
