"""``deepspeed.runtime.utils.clip_grad_norm_`` (DeepSpeed's, with an mpu): one process against
``torch.nn.utils.clip_grad_norm_``; 2 gloo ranks holding halves of a model-parallel weight
against one process holding it whole."""

from __future__ import annotations

import math

import pytest
import torch

from ds_all.runtime.utils import clip_grad_norm_, is_model_parallel_parameter
from ds_comm.testing import run_distributed


def _params(seed: int, scale: float = 1.0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(6, 4, generator=g)) for _ in range(2)]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * scale
    return ps


@pytest.mark.parametrize("norm_type", [2, 1, 3.5, math.inf])
@pytest.mark.parametrize("max_norm", [0.5, 1e3], ids=["clips", "no-clip"])
def test_one_process_equals_torch(norm_type, max_norm):
    ours, ref = _params(0), _params(0)
    total = clip_grad_norm_(ours, max_norm, norm_type=norm_type)
    expect = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type=norm_type)
    torch.testing.assert_close(total, expect, rtol=1e-6, atol=0)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)
    single = _params(0)[0]
    assert clip_grad_norm_(single, 1e3, norm_type) > 0  # a lone tensor is taken as well


def test_no_gradient_is_a_clear_error():
    with pytest.raises(ValueError, match="no parameter has a gradient"):
        clip_grad_norm_([torch.nn.Parameter(torch.ones(2))], 1.0)


class _MPU:
    """Both ranks are one model-parallel group (a tensor-parallel pair); each its own
    data-parallel group."""

    def __init__(self, rank: int, dp_groups) -> None:
        self.rank, self.dp_groups = rank, dp_groups

    def get_model_parallel_group(self):
        return None  # the world: both ranks

    def get_model_parallel_rank(self) -> int:
        return self.rank

    def get_data_parallel_group(self):
        return self.dp_groups[self.rank]


def _mp_rank(norm_type: float):
    import torch.distributed as dist

    rank = dist.get_rank()
    dp_groups = [dist.new_group([0]), dist.new_group([1])]  # every rank creates every group
    weight, bias = _params(7, scale=3.0)
    half = torch.nn.Parameter(weight.detach()[rank * 3 : rank * 3 + 3].clone())
    half.grad = weight.grad[rank * 3 : rank * 3 + 3].clone()
    half.model_parallel = True  # Megatron's mark: split over the model-parallel ranks
    assert is_model_parallel_parameter(half) and not is_model_parallel_parameter(bias)
    total = clip_grad_norm_([half, bias], 2.0, norm_type=norm_type, mpu=_MPU(rank, dp_groups))
    return float(total), half.grad, bias.grad


def _no_mpu_rank():
    import torch.distributed as dist

    rank = dist.get_rank()
    ps = _params(rank, scale=1.0 + rank)  # different gradients per rank
    own = float(torch.nn.utils.get_total_norm([p.grad for p in ps]))
    return own, float(clip_grad_norm_(ps, 1e3))


@pytest.mark.parametrize("norm_type", [2, math.inf])
def test_model_parallel_halves_equal_one_process(norm_type):
    results = run_distributed(_mp_rank, 2, args=(norm_type,), timeout=120)
    weight, bias = _params(7, scale=3.0)
    expect = torch.nn.utils.clip_grad_norm_([weight, bias], 2.0, norm_type=norm_type)
    for rank, (total, half_grad, bias_grad) in enumerate(results):
        # the replicated bias counted once (rank 0), the weight's halves on both ranks
        assert total == pytest.approx(float(expect), rel=1e-6)
        torch.testing.assert_close(half_grad, weight.grad[rank * 3 : rank * 3 + 3], rtol=1e-6,
                                   atol=1e-7)  # fmt: skip
        torch.testing.assert_close(bias_grad, bias.grad, rtol=1e-6, atol=1e-7)


def test_without_mpu_the_norm_is_averaged_over_the_world():
    # DeepSpeed's rule for expert parameters, whose gradients differ per rank
    (own0, total0), (own1, total1) = run_distributed(_no_mpu_rank, 2, timeout=120)
    assert own0 != pytest.approx(own1)
    assert total0 == pytest.approx((own0 + own1) / 2, rel=1e-6) == total1
