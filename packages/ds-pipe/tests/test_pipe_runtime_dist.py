"""gloo, 2 and 4 ranks: the pipeline matches single-process training of the same model."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from pipe_models import BASE_SEED, PlainSGD, Reference, data, loss_fn, reference_run, specs

from ds_comm.testing import distributed_test
from ds_pipe import (
    PipeDataParallelTopology,
    PipelineGrid,
    PipelineModule,
    PipelineRuntime,
    PipeModelDataParallelTopology,
)

RTOL, ATOL = 1e-5, 1e-7
MICRO_BATCHES, MBS, BLOCKS = 4, 2, 6


def _module(kind, pp, dp, num_chunks=1, **kw):
    return PipelineModule(
        specs(kind, BLOCKS),
        topology=PipeDataParallelTopology(pp, dp),
        loss_fn=loss_fn,
        partition_method="uniform",
        seed_layers=True,
        base_seed=BASE_SEED,
        num_chunks=num_chunks,
        **kw,
    )


def _check_grads(module, ref_grads, where):
    names = dict(module.named_parameters())
    assert names, "this stage owns no parameters"
    for name, p in names.items():
        assert p.grad is not None, f"{where}: {name} has no gradient"
        torch.testing.assert_close(
            p.grad, ref_grads[name], rtol=RTOL, atol=ATOL, msg=f"{where}: {name}"
        )


def _train_and_compare(kind, schedule, pp, dp, num_chunks=1, steps=2, **module_kw):
    module = _module(kind, pp, dp, num_chunks, **module_kw)
    rt = PipelineRuntime(module, micro_batches=MICRO_BATCHES, schedule=schedule)
    opt = PlainSGD(module.parameters(), lr=0.1)
    ref_losses, ref_grads, ref_params = reference_run(
        specs(kind, BLOCKS), steps, MICRO_BATCHES, MBS, dp
    )
    for step in range(steps):
        it = iter(data(step, rt.grid.data_parallel_id, MICRO_BATCHES, MBS))
        loss = rt.train_batch(it)
        # Every rank of a replica reports that replica's mean loss; the reference saw every
        # replica's data, so average over all ranks.
        dist.all_reduce(loss)
        loss /= dist.get_world_size()
        torch.testing.assert_close(loss.item(), ref_losses[step], rtol=RTOL, atol=0)
        _check_grads(module, ref_grads[step], f"{schedule} step {step} rank {dist.get_rank()}")
        opt.step()
        opt.zero_grad()
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.detach(), ref_params[name], rtol=RTOL, atol=ATOL, msg=name)


@distributed_test(world_size=[2, 4], timeout=240)
def test_schedules_and_tied_embeddings_match_single_process(world_size):
    # One spawn covers several cases: starting ranks dominates the cost of these tests.
    for schedule, chunks in [("1f1b", 1), ("gpipe", 1), ("interleaved_1f1b", 2)]:
        _train_and_compare("plain", schedule, pp=world_size, dp=1, num_chunks=chunks)
    # tied embedding on the first and the last stage
    module = _module("tied", world_size, 1)
    stage = dist.get_rank()
    assert ("tied.emb.weight" in dict(module.named_parameters())) == (stage in (0, world_size - 1))
    _train_and_compare("tied", "1f1b", pp=world_size, dp=1)
    if world_size == 2:
        _check_eval_batch_and_shape_renegotiation()


@distributed_test(world_size=[2, 4], timeout=120)
def test_tuple_of_three_tensors_one_integer(world_size):
    _train_and_compare("tuple", "1f1b", pp=world_size, dp=1)
    # and with activation checkpointing and virtual stages on top
    _train_and_compare(
        "tuple",
        "interleaved_1f1b",
        pp=world_size,
        dp=1,
        num_chunks=2,
        activation_checkpoint_interval=1,
        steps=1,
    )


def _check_grid_groups():
    """The grids' real process groups hold the ranks their coordinates say (4 ranks)."""
    rank = dist.get_rank()
    ranks = dist.get_process_group_ranks
    g = PipelineGrid(PipeDataParallelTopology(2, 2))  # rank = 2 * pipe + data
    assert ranks(g.pipe_group) == [rank % 2, rank % 2 + 2]
    assert ranks(g.data_parallel_group) == [rank - rank % 2, rank - rank % 2 + 1]
    assert ranks(g.model_parallel_group) == [rank % 2, rank % 2 + 2]  # one replica
    assert g.slice_parallel_group is None and g.get_slice_parallel_world_size() == 1
    # pipe 2 x model 2 (x data 1): rank = 2 * pipe + model
    g3 = PipelineGrid(PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=1))
    assert ranks(g3.slice_parallel_group) == [rank - rank % 2, rank - rank % 2 + 1]
    assert ranks(g3.pipe_group) == [rank % 2, rank % 2 + 2]
    assert ranks(g3.model_parallel_group) == [0, 1, 2, 3]
    assert g3.get_data_parallel_world_size() == 1
    assert g3.stage_to_global(1, model=0) == 2
    t = torch.ones(1)
    dist.all_reduce(t, group=g3.get_slice_parallel_group())
    assert t.item() == 2


@distributed_test(world_size=4, timeout=300)
def test_pp2_dp2_tied_with_clipping_and_with_zero1_inside_each_stage():
    # both 2 x 2 cases in one spawn: starting 4 ranks on 2 cores costs more than either check
    steps, max_norm = 3, 0.05
    module = _module("tied", 2, 2)
    opt = PlainSGD(module.parameters(), lr=0.1)
    rt = PipelineRuntime(module, opt, micro_batches=MICRO_BATCHES, max_grad_norm=max_norm)
    assert rt.grid.data_parallel_size == 2 and len(rt.grid.data_parallel_ranks) == 2
    _check_grid_groups()
    # reference with clipping
    ref = Reference(specs("tied", BLOCKS))
    ref_opt = PlainSGD(ref.parameters(), lr=0.1)
    for step in range(steps):
        loss = rt.train_batch(iter(data(step, rt.grid.data_parallel_id, MICRO_BATCHES, MBS)))
        batches = [b for r in range(2) for b in data(step, r, MICRO_BATCHES, MBS)]
        ref_loss = sum(loss_fn(ref(x), y) for x, y in batches) / len(batches)
        ref_opt.zero_grad()
        ref_loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
        ref_opt.step()
        torch.testing.assert_close(rt.last_grad_norm, norm, rtol=RTOL, atol=0)
        assert norm > max_norm  # clipping was exercised
        mine = torch.stack([loss, torch.zeros(())])
        dist.all_reduce(mine)
        torch.testing.assert_close(mine[0].item() / 4, ref_loss.item(), rtol=RTOL, atol=0)
    ref_params = dict(ref.named_parameters())
    for name, p in module.named_parameters():
        torch.testing.assert_close(
            p.detach(), ref_params[name].detach(), rtol=RTOL, atol=ATOL, msg=name
        )
    _check_zero1_inside_each_stage()


def _check_eval_batch_and_shape_renegotiation():
    module = _module("tuple", 2, 1)
    rt = PipelineRuntime(module, micro_batches=MICRO_BATCHES)
    ref = Reference(specs("tuple", BLOCKS))
    for mbs in (2, 3, 2):  # a different micro-batch size forces new shapes, then back
        batches = data(7, 0, MICRO_BATCHES, mbs)
        loss, outputs = rt.eval_batch(iter(batches), return_outputs=True)
        with torch.no_grad():
            ref_out = [ref(x) for x, _ in batches]
            ref_loss = sum(loss_fn(o, y) for o, (_, y) in zip(ref_out, batches)) / len(batches)
        torch.testing.assert_close(loss.item(), ref_loss.item(), rtol=RTOL, atol=0)
        if dist.get_rank() == 1:
            assert len(outputs) == MICRO_BATCHES
            for o, r in zip(outputs, ref_out):
                torch.testing.assert_close(o, r, rtol=RTOL, atol=ATOL)
        else:
            assert outputs == []
        # training still works with the new shapes
        rt.train_batch(iter(batches))
        module.zero_grad()


def _check_zero1_inside_each_stage():
    """The recipe of the README: ds-zero stage 1 over each stage's data-parallel group does
    the reduction and the step (ds-zero is a test-only dependency of ds-pipe)."""
    import ds_zero

    steps = 2
    module = _module("plain", 2, 2)
    rt = PipelineRuntime(module, micro_batches=MICRO_BATCHES, reduce_data_parallel=False)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    options = ds_zero.ZeroOptions(
        stage=1, gradient_accumulation_steps=MICRO_BATCHES, reduce_bucket_size=64
    )
    zero = ds_zero.wrap(module, opt, options, dp_group=rt.grid.data_parallel_group)
    ref_losses, _, ref_params = reference_run(specs("plain", BLOCKS), steps, MICRO_BATCHES, MBS, 2)
    for step in range(steps):
        loss = rt.train_batch(iter(data(step, rt.grid.data_parallel_id, MICRO_BATCHES, MBS)))
        assert zero.step(), "ds-zero saw every micro-batch's backward: the step is due"
        dist.all_reduce(loss)
        torch.testing.assert_close(loss.item() / 4, ref_losses[step], rtol=RTOL, atol=0)
    # optimizer state is partitioned over the 2 ranks of this stage's data-parallel group
    held = sum(f.numel for f in zero.state_fragments() if not f.name.startswith("optimizer."))
    local = sum(p.numel() for p in module.parameters())
    assert 0 < held < local
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.detach(), ref_params[name], rtol=RTOL, atol=ATOL, msg=name)
    # Tied layers do not compose with it yet (ds-zero takes the gradients in backward hooks,
    # before the tie all-reduce): a clear error on the ranks holding the tie, not wrong weights.
    tied = _module("tied", 2, 2)
    rt = PipelineRuntime(tied, micro_batches=MICRO_BATCHES, reduce_data_parallel=False)
    ds_zero.wrap(tied, torch.optim.SGD(tied.parameters(), lr=0.1), options,
                 dp_group=rt.grid.data_parallel_group)  # fmt: skip
    with pytest.raises(RuntimeError, match="tied module 'emb' has no gradients"):
        rt.train_batch(iter(data(0, rt.grid.data_parallel_id, MICRO_BATCHES, MBS)))
