"""Tier 3: parity checks on CUDA: the stages on 2 GPUs with NCCL (``gpu(n=2)``, skipped below 2
GPUs), host parameter shards on one GPU (``gpu``, runs on a one-GPU machine).

PYTHONPATH=$(ls -d packages/*/src | tr '\\n' ':') python -m pytest packages/ds-zero/tests/test_gpu.py -q
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from zero_helpers import assert_close_state, assert_close_state_bf16, reference, train_zero

import ds_zero
from ds_comm.testing import distributed_test


@pytest.mark.gpu(n=2)
@distributed_test(world_size=2, backend="nccl", timeout=300)
def test_gpu_stages_match_reference(world_size):
    torch.cuda.set_device(dist.get_rank())
    kw = {"tied": True, "twice": True, "frozen": True}
    ref_losses, ref_state = reference(world_size, device="cuda", **kw)
    for dtype in (torch.float32, torch.bfloat16):
        for stage in (0, 1, 2, 3):
            opts = ds_zero.ZeroOptions(
                stage=stage,
                param_dtype=dtype,
                reduce_bucket_size=300,
                param_persistence_threshold=40,
            )
            losses, zero = train_zero(opts, device="cuda", **kw)
            state = zero.full_state_dict()
            if dtype == torch.float32:
                # TF32 is off by default for matmuls; NCCL sums in a different order than one GPU
                torch.testing.assert_close(
                    torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=0
                )
                assert_close_state(state, ref_state, rtol=1e-4, atol=1e-5)
            else:
                torch.testing.assert_close(
                    torch.tensor(losses), torch.tensor(ref_losses), rtol=2e-2, atol=0
                )
                assert_close_state_bf16(state, ref_state, atol=2e-2, bound=0.1)
            zero.close()


@pytest.mark.gpu
@distributed_test(world_size=1, backend="nccl", timeout=300)
def test_gpu_host_param_shards_match_device_shards(world_size):
    """offload_param cpu on a real device: stage-3 shards in pinned host memory, copied to the
    GPU by each gather (asynchronously), train exactly like shards kept on the GPU."""
    torch.cuda.set_device(0)
    for dtype in (torch.float32, torch.bfloat16):
        base = dict(stage=3, param_dtype=dtype, param_persistence_threshold=0)
        ref_losses, ref = train_zero(ds_zero.ZeroOptions(**base), device="cuda")
        losses, zero = train_zero(
            ds_zero.ZeroOptions(**base, host_param_shards=True), device="cuda"
        )
        assert losses == ref_losses
        want, got = ref.full_state_dict(), zero.full_state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)
        shards = [b.local_shard for b in zero.buckets if b.shard_params]
        assert shards and all(s.device.type == "cpu" and s.is_pinned() for s in shards)
        ref.close()
        zero.close()
