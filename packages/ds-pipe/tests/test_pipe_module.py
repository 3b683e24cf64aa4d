"""Tier 1: topology math, partitioning, PipelineModule construction, stage I/O metadata."""

from __future__ import annotations

import pytest
import torch
from pipe_models import BASE_SEED, Block, Reference, loss_fn, specs
from torch import nn

from ds_pipe import (
    LayerSpec,
    PartitionError,
    PayloadMeta,
    PipeDataParallelTopology,
    PipelineModule,
    PipeModelDataParallelTopology,
    ProcessTopology,
    StageIOError,
    TiedLayerSpec,
    balanced_boundaries,
    layer_weights,
)

# -- topology ---------------------------------------------------------------------------------


def test_pipe_data_topology_puts_replicas_on_neighbouring_ranks():
    topo = PipeDataParallelTopology(num_pp=2, num_dp=2)
    assert [tuple(topo.get_coord(r)) for r in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert topo.get_rank(pipe=1, data=0) == 2
    assert topo.axis_groups("pipe") == [[0, 2], [1, 3]]
    assert topo.axis_groups("data") == [[0, 1], [2, 3]]
    assert topo.filter_match(pipe=1) == [2, 3]
    assert topo.get_dim("model") == 0  # DeepSpeed: 0 for an axis the topology lacks


def test_3d_topology_round_trips_every_rank():
    topo = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=3)
    assert topo.world_size() == 12
    for r in range(12):
        assert topo.get_rank(**topo.get_coord(r)._asdict()) == r
    assert topo.get_coord(1).model == 1 and topo.get_coord(2).data == 1
    assert all(len(g) == 2 for g in topo.axis_groups("pipe"))


def test_topology_answers_as_deepspeeds_process_topology():
    # the examples of DeepSpeed's ProcessTopology docstrings, answer for answer
    xy = ProcessTopology(axes=["x", "y"], dims=[2, 3])
    assert xy.get_rank(x=0, y=1) == 1 and xy.get_dim("y") == 3
    assert (xy.get_coord(rank=1).x, xy.get_coord(rank=1).y) == (0, 1)
    assert xy.get_axis_list(axis="x", idx=0) == [0, 1, 2]
    assert xy.get_axis_list(axis="y", idx=0) == [0, 3]
    assert xy.get_axis_names() == ["x", "y"] and xy.world_size() == 6
    ab = ProcessTopology(axes=["a", "b"], dims=[2, 2])
    assert ab.get_rank_repr(rank=3) == "a_01-b_01"
    assert ab.get_rank_repr(rank=3, omit_axes=["a"]) == "b_01"
    pdm = ProcessTopology(axes=["pipe", "data", "model"], dims=[2, 2, 2])
    assert pdm.get_axis_comm_lists("pipe") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert pdm.get_axis_comm_lists("tensor") == []
    assert pdm.filter_match(pipe=0, data=1) == [2, 3]
    # the default checkpoint name of a rank keeps only the model (tensor-slice) axis
    topo = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=2)
    assert [topo.get_rank_repr(r) for r in range(4)] == ["model_00", "model_01"] * 2
    with pytest.raises(ValueError, match="no axis"):
        pdm.get_axis_list("tensor", 0)
    with pytest.raises(ValueError, match="no axis"):
        pdm.filter_match(stage=0)


def test_grid_groups_and_mpu_interface_without_a_process_group():
    from ds_pipe import PipelineGrid

    topo = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=2)  # ranks: pipe, data, model
    g = PipelineGrid(topo, rank=5)  # pipe 1, data 0, model 1
    assert (g.stage_id, g.data_parallel_id, g.model_parallel_id) == (1, 0, 1)
    assert g.pipe_ranks == [1, 5] and g.data_parallel_ranks == [5, 7]
    assert g.model_parallel_ranks == [0, 1, 4, 5]  # one whole replica (DeepSpeed's meaning)
    assert g.slice_parallel_ranks == [4, 5]  # the tensor-parallel peers
    assert g.stage_to_global(0) == 1
    assert g.stage_to_global(0, data=1) == 3 and g.stage_to_global(1, model=0) == 4
    with pytest.raises(ValueError, match="no axis"):
        g.stage_to_global(0, tensor=1)
    assert (g.get_pipe_parallel_rank(), g.get_pipe_parallel_world_size()) == (1, 2)
    assert (g.get_data_parallel_rank(), g.get_data_parallel_world_size()) == (0, 2)
    assert (g.get_model_parallel_rank(), g.get_model_parallel_world_size()) == (3, 4)
    assert (g.get_slice_parallel_rank(), g.get_slice_parallel_world_size()) == (1, 2)
    assert g.get_global_rank() == 5 and g.is_last_stage and not g.is_first_stage
    # a topology without a data or model axis still has size-1 axes in the grid
    flat = PipelineGrid(ProcessTopology(["pipe"], [4]), rank=2)
    assert (flat.data_parallel_size, flat.model_parallel_size) == (1, 1)
    assert flat.data_parallel_ranks == [2] and flat.slice_parallel_ranks == [2]


def test_topology_errors_name_the_problem():
    with pytest.raises(ValueError, match="2 axes"):
        ProcessTopology(["pipe", "data"], [2])
    with pytest.raises(ValueError, match="outside the topology"):
        PipeDataParallelTopology(2, 1).get_coord(5)
    with pytest.raises(ValueError, match="exactly the axes"):
        PipeDataParallelTopology(2, 1).get_rank(pipe=0)


# -- partitioning -----------------------------------------------------------------------------


def test_balanced_boundaries_minimise_the_heaviest_stage():
    assert balanced_boundaries([1, 1, 1, 1], 2) == [0, 2, 4]
    assert balanced_boundaries([5, 1, 1, 1, 1, 1], 2) == [0, 1, 6]
    assert balanced_boundaries([1, 2, 3, 4, 5, 6, 7, 8, 9], 3) == [0, 5, 7, 9]
    # every stage gets a layer even when weights are zero
    assert balanced_boundaries([0, 0, 0, 4], 3) == [0, 1, 2, 4]
    with pytest.raises(PartitionError, match="cannot split 2 layers into 3 stages"):
        balanced_boundaries([1, 1], 3)


def test_uniform_partition_is_deepspeeds():
    # DeepSpeed's partition_uniform: the spare layers go one each to the first stages
    from ds_pipe._partition import partition

    layers = [LayerSpec(Block) for _ in range(10)]
    assert partition(layers[:7], 3, "uniform") == [0, 3, 5, 7]
    assert partition(layers, 4, "uniform") == [0, 3, 6, 8, 10]
    assert partition(layers[:8], 4, "UNIFORM") == [0, 2, 4, 6, 8]
    with pytest.raises(PartitionError, match="cannot split 2 layers into 3 stages"):
        partition(layers[:2], 3, "uniform")


class NeedsStorage(nn.Linear):
    def __init__(self) -> None:
        super().__init__(2, 2)
        self.scale = float(
            self.weight.detach().sum()
        )  # reads values: impossible on the meta device


def test_parameter_counting_failure_names_the_layer_and_the_fix():
    layers = [LayerSpec(Block), LayerSpec(NeedsStorage), LayerSpec(Block)]
    with pytest.raises(PartitionError, match=r"layers\[1\] \(NeedsStorage\).*'uniform'"):
        PipelineModule(layers, num_stages=1)
    assert PipelineModule(layers, num_stages=1, partition_method="uniform").parts == [0, 3]


def test_partition_methods():
    layers = specs("plain", 4)  # Embed, 4 x Block, Head
    assert layer_weights(layers, "uniform") == [1.0] * 6
    params = layer_weights(layers, "parameters")
    assert params[1] == 8 * 8 + 8 and params[0] == 16 * 8
    assert layer_weights(layers, "type:block") == [0, 1, 1, 1, 1, 0]
    with pytest.raises(PartitionError, match="matches no layer"):
        layer_weights(layers, "type:attention")
    with pytest.raises(PartitionError, match="unknown partition_method"):
        layer_weights(layers, "flops")
    tied = specs("tied", 2)
    w = layer_weights(tied, "parameters")
    assert w[0] == 16 * 8 and w[-1] == 0  # the tied copy adds no parameters


def test_explicit_boundaries_are_checked():
    m = PipelineModule(specs("plain", 4), num_stages=2, stage_id=1, partition_method=[0, 4, 6])
    assert m.parts == [0, 4, 6] and sorted(m.layers.keys()) == ["4", "5"]
    with pytest.raises(PartitionError, match="increasing boundaries"):
        PipelineModule(specs("plain", 4), num_stages=2, stage_id=0, partition_method=[0, 3, 5])


# -- module -----------------------------------------------------------------------------------

BUILT: list[int] = []


class Counted(nn.Linear):
    def __init__(self, tag: int) -> None:
        BUILT.append(tag)
        super().__init__(2, 2)


def test_only_owned_layers_are_built():
    layers = [LayerSpec(Counted, i) for i in range(8)]
    BUILT.clear()
    m = PipelineModule(layers, num_stages=4, stage_id=2, partition_method="uniform")
    assert BUILT == [4, 5]
    assert sorted(m.layers.keys()) == ["4", "5"]
    BUILT.clear()
    m = PipelineModule(layers, num_stages=2, stage_id=1, num_chunks=2, partition_method="uniform")
    assert BUILT == [2, 3, 6, 7]  # virtual stages 1 and 3 of 4
    assert m.local_stages() == [1, 3]


@pytest.mark.parametrize("kind", ["plain", "tied", "tuple"])
def test_parameter_names_and_values_do_not_depend_on_the_stage_count(kind):
    ref = {n: p for n, p in Reference(specs(kind, 6)).named_parameters()}
    for p, v in [(1, 1), (2, 1), (4, 1), (2, 2), (4, 2)]:
        seen: dict[str, torch.Tensor] = {}
        for stage in range(p):
            m = PipelineModule(
                specs(kind, 6),
                num_stages=p,
                stage_id=stage,
                num_chunks=v,
                seed_layers=True,
                base_seed=BASE_SEED,
                partition_method="uniform",
            )
            for n, t in m.named_parameters():
                if n in seen:  # a tied module held by two stages
                    assert n.startswith("tied.") and torch.equal(seen[n], t)
                seen[n] = t.detach()
        assert sorted(seen) == sorted(ref)
        for n in ref:
            assert torch.equal(seen[n], ref[n].detach()), (p, v, n)


def test_single_stage_module_runs_forward_like_the_reference():
    m = PipelineModule(
        specs("tuple", 3),
        num_stages=1,
        seed_layers=True,
        base_seed=BASE_SEED,
        loss_fn=loss_fn,
        activation_checkpoint_interval=2,
    )
    ref = Reference(specs("tuple", 3))
    x = torch.randint(0, 16, (2, 4))
    torch.testing.assert_close(m(x), ref(x))
    m(x).sum().backward()  # checkpointed path runs backward too
    assert all(p.grad is not None for p in m.parameters())


def test_module_argument_errors():
    with pytest.raises(ValueError, match="pass stage_id"):
        PipelineModule(specs("plain", 2), num_stages=2)
    with pytest.raises(ValueError, match="num_stages or topology"):
        PipelineModule(specs("plain", 2))
    with pytest.raises(ValueError, match="disagrees"):
        PipelineModule(
            specs("plain", 2), num_stages=2, topology=PipeDataParallelTopology(4, 1), stage_id=0
        )
    with pytest.raises(TypeError, match=r"layers\[1\]"):
        PipelineModule([LayerSpec(Block), 3], num_stages=1)
    with pytest.raises(ValueError, match="without '.'"):
        TiedLayerSpec("a.b", nn.Linear, 2, 2)
    m = PipelineModule(specs("plain", 2), num_stages=2, stage_id=0)
    with pytest.raises(RuntimeError, match="train_batch"):
        m(torch.zeros(1, 4, dtype=torch.long))


# -- stage I/O metadata -----------------------------------------------------------------------


def test_payload_meta_round_trips_tuples_of_mixed_dtypes():
    h = torch.randn(2, 3, requires_grad=True) * 2
    ids = torch.arange(6).view(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    meta = PayloadMeta.of((h, ids, mask, torch.randn(4, dtype=torch.bfloat16)), "stage 0")
    assert meta.grad_indices() == [0]
    decoded = PayloadMeta.decode(meta.encode())
    assert decoded == meta
    bufs = decoded.empty(torch.device("cpu"))
    assert [b.dtype for b in bufs] == [torch.float32, torch.int64, torch.bool, torch.bfloat16]
    single = PayloadMeta.of(torch.zeros(5), "s")
    assert not single.is_tuple and PayloadMeta.decode(single.encode()) == single


def test_payload_meta_rejects_what_cannot_be_sent():
    with pytest.raises(StageIOError, match="only tensors"):
        PayloadMeta.of((torch.zeros(1), 3), "stage 1 (layers 2..3)")
    with pytest.raises(StageIOError, match="returned dict"):
        PayloadMeta.of({"x": torch.zeros(1)}, "stage 0")
    with pytest.raises(StageIOError, match="concatenate"):
        PayloadMeta.of(tuple(torch.zeros([1] * 8) for _ in range(40)), "stage 0").encode()


# -- runtime without a process group (one rank holds every stage) -----------------------------


@pytest.mark.parametrize("schedule, chunks", [("1f1b", 1), ("gpipe", 2), ("interleaved_1f1b", 3)])
def test_single_rank_runtime_hands_stages_over_in_memory(schedule, chunks):
    from pipe_models import PlainSGD, data, reference_run

    from ds_pipe import PipelineRuntime

    module = PipelineModule(
        specs("tuple", 4),
        num_stages=1,
        loss_fn=loss_fn,
        seed_layers=True,
        base_seed=BASE_SEED,
        num_chunks=chunks,
        partition_method="uniform",
    )
    rt = PipelineRuntime(
        module, PlainSGD(module.parameters(), 0.1), micro_batches=3, schedule=schedule
    )
    ref_losses, _, ref_params = reference_run(specs("tuple", 4), 2, 3, 2, 1)
    for step in range(2):
        loss = rt.train_batch(iter(data(step, 0, 3, 2)))
        assert loss.item() == pytest.approx(ref_losses[step], rel=1e-5)
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.detach(), ref_params[name], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="data_iter"):
        rt.train_batch(None)
