"""Small DeepSpeed helpers scripts import: ``RepeatingLoader``, ``instrument_w_nvtx``,
``get_global_norm``, ``is_compile_supported``."""

from __future__ import annotations

import math

import torch

import ds_all
from ds_all.runtime.dataloader import RepeatingLoader
from ds_all.runtime.utils import get_global_norm, is_invalid_grad_norm
from ds_all.utils import instrument_w_nvtx


def test_repeating_loader_restarts_its_loader():
    loader = torch.utils.data.DataLoader(list(range(5)), batch_size=2)
    it = RepeatingLoader(loader)
    got = [next(it).tolist() for _ in range(5)]
    assert got == [[0, 1], [2, 3], [4], [0, 1], [2, 3]]
    assert iter(it) is it and ds_all.utils.RepeatingLoader is RepeatingLoader
    empty = RepeatingLoader([])
    try:
        next(empty)
    except StopIteration:
        pass
    else:
        raise AssertionError("an empty loader has nothing to repeat")


def test_instrument_w_nvtx_keeps_the_function():
    @instrument_w_nvtx
    def add(a, b=1):
        """adds"""
        return a + b

    assert add(2, b=3) == 5 and add.__name__ == "add" and add.__doc__ == "adds"


def test_global_norm_and_invalid_norms():
    assert get_global_norm([3.0, 4.0]) == 5.0
    assert get_global_norm([torch.tensor(6.0), 8.0]) == 10.0
    assert get_global_norm([1.0, -1]) == math.inf  # DeepSpeed's -1: an overflow
    assert get_global_norm([float("nan")]) == math.inf
    assert is_invalid_grad_norm(torch.tensor([1.0, float("inf")]))
    assert not is_invalid_grad_norm(0.0)


def test_is_compile_supported():
    assert ds_all.is_compile_supported() is True  # the torch this package supports is >= 2.1


def test_on_device_builds_modules_on_meta_in_the_dtype():
    from torch import nn

    with ds_all.OnDevice(dtype=torch.float16, device="meta"):
        lin = nn.Linear(4, 8)
        emb = nn.Embedding(10, 3)
        ids = torch.zeros(3, dtype=torch.long)
        here = torch.ones(2, device="cpu")  # an explicit device is kept
    assert lin.weight.is_meta and lin.weight.dtype == torch.float16 and lin.bias.is_meta
    assert emb.weight.is_meta and emb.weight.dtype == torch.float16
    assert ids.is_meta and ids.dtype == torch.long  # integers keep their dtype
    assert here.device.type == "cpu" and here.dtype == torch.float16
    # outside, and with enabled=False, nothing changes
    assert nn.Linear(2, 2).weight.device.type == "cpu"
    with ds_all.utils.OnDevice(dtype=torch.float16, enabled=False):
        assert nn.Linear(2, 2).weight.dtype == torch.float32
