"""ZeRO's collectives use torch's current names: a step under gloo emits no FutureWarning (torch
2.12+ deprecates all_gather_into_tensor / reduce_scatter_tensor with one on every call)."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from zero_helpers import make_model, train_zero

import ds_zero
from ds_comm.testing import distributed_test


@distributed_test(world_size=2, timeout=180)
def test_zero_steps_emit_no_future_warning(world_size):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warnings.simplefilter("error", FutureWarning)
        for stage in (1, 2, 3):
            opts = ds_zero.ZeroOptions(
                stage=stage, reduce_bucket_size=300, param_persistence_threshold=40
            )
            _, zero = train_zero(opts, steps=2)
            zero.full_state_dict()  # the consolidating all-gather
            zero.close()
        with ds_zero.Init():  # partitioned construction, then gathered by wrap
            model = make_model()
        zero = ds_zero.wrap(
            model, torch.optim.SGD(model.parameters(), lr=0.1), ds_zero.ZeroOptions(stage=3)
        )
        zero.close()
    future = [w for w in seen if issubclass(w.category, FutureWarning)]
    assert not future, [str(w.message) for w in future]
    assert dist.get_world_size() == world_size
