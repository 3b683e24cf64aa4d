"""``deepspeed.utils.groups`` after ``initialize()`` with sequence parallelism (what HF
Trainer and ArcticTraining read), DeepSpeed's engine attributes ``dp_world_size``,
``seq_dp_world_size``, ``seq_data_parallel_group``, ``data_parallel_group``, the
``data_parallel_size`` key and ``initialize()``'s ``distributed_port`` / ``mesh_param``."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.distributed as dist
from torch import nn

from ds_comm.testing import distributed_test


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1)


def _init(config, **kw):
    import ds_all

    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, **config}
    engine, *_ = ds_all.initialize(model=nn.Linear(4, 4), optimizer=_sgd, config=cfg, **kw)
    return engine


def _ranks(group):
    return dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)


def _assert_layout(engine, sp: int, dp: int) -> None:
    from ds_all.utils import groups

    rank = dist.get_rank()
    assert groups._get_sequence_parallel_world_size() == sp
    assert groups._get_sequence_parallel_rank() == rank % sp
    assert groups._get_data_parallel_world_size() == dp
    assert groups._get_data_parallel_rank() == rank // sp
    assert groups._get_sequence_data_parallel_world_size() == sp * dp
    assert groups._get_sequence_data_parallel_rank() == rank
    assert _ranks(groups._get_sequence_data_parallel_group()) == list(range(sp * dp))
    if sp > 1:
        start = rank - rank % sp
        assert _ranks(groups._get_sequence_parallel_group()) == list(range(start, start + sp))
    else:
        assert groups._get_sequence_parallel_group() is None
    assert _ranks(groups._get_data_parallel_group()) == list(range(rank % sp, sp * dp, sp))
    # the engine's attributes, as DeepSpeed's _configure_distributed_model sets them
    assert engine.sequence_parallel_size == sp
    assert engine.dp_world_size == dp
    assert engine.seq_dp_world_size == sp * dp
    assert _ranks(engine.seq_data_parallel_group) == list(range(sp * dp))
    assert _ranks(engine.data_parallel_group) == _ranks(groups._get_data_parallel_group())
    assert engine.train_batch_size() == dp


@distributed_test(world_size=2, timeout=120)
def test_groups_report_the_engines_sequence_parallel_groups_sp2():
    from ds_all.utils import groups

    engine = _init({"sequence_parallel_size": 2}, dist_init_required=False)
    _assert_layout(engine, sp=2, dp=1)
    assert groups._get_sequence_parallel_group() is engine.get_sequence_parallel_group()
    engine.destroy()
    # destroy clears the record: the getters report no sequence parallelism again
    assert groups._get_sequence_parallel_world_size() == 1
    assert groups._get_sequence_parallel_group() is None
    assert groups._get_data_parallel_world_size() == 2
    # sp = 1 after sp = 2: the old values
    engine = _init({"sequence_parallel_size": 1}, dist_init_required=False)
    _assert_layout(engine, sp=1, dp=2)
    assert groups._get_sequence_parallel_rank() == 0
    engine.destroy()


@distributed_test(world_size=4, timeout=180)
def test_data_parallel_size_and_mesh_param_build_dp_x_sp():
    import ds_all
    from ds_all._config_base import ConfigError

    engine = _init({"sequence_parallel_size": 2, "data_parallel_size": 2}, dist_init_required=False)
    _assert_layout(engine, sp=2, dp=2)
    engine.destroy()
    # DeepSpeed's mesh_param=(dp, sp) sets the layout; the config may repeat it
    engine = _init({}, dist_init_required=False, mesh_param=(2, 2))
    _assert_layout(engine, sp=2, dp=2)
    engine.destroy()
    engine = _init({"sequence_parallel_size": 4}, dist_init_required=False, mesh_param=[1, 4])
    _assert_layout(engine, sp=4, dp=1)
    engine.destroy()
    with pytest.raises(ConfigError, match=r"data_parallel_size \(3\) x sequence_parallel_size \(2\) = 6 "
                                          r"but the world size is 4"):  # fmt: skip
        _init({"sequence_parallel_size": 2, "data_parallel_size": 3}, dist_init_required=False)
    with pytest.raises(ConfigError, match="data_parallel_size .* world size is 4"):
        _init({"data_parallel_size": 2}, dist_init_required=False)
    with pytest.raises(ConfigError, match=r"= 8 but the world size is 4"):
        _init({}, dist_init_required=False, mesh_param=(4, 2))
    with pytest.raises(ConfigError, match='config has "sequence_parallel_size": 2'):
        _init({"sequence_parallel_size": 2}, dist_init_required=False, mesh_param=(1, 4))
    with pytest.raises(ConfigError, match='config has "data_parallel_size": 4'):
        _init({"data_parallel_size": 4}, dist_init_required=False, mesh_param=(2, 2))
    assert ds_all.utils.groups._get_sequence_parallel_world_size() == 1


def test_initialize_signature_is_deepspeeds():
    import ds_all

    params = inspect.signature(ds_all.initialize).parameters
    # deepspeed/__init__.py 0.19.8: distributed_port 7th, mesh_param before config_params
    assert list(params) == [
        "args", "model", "optimizer", "model_parameters", "training_data", "lr_scheduler",
        "distributed_port", "mpu", "dist_init_required", "collate_fn", "config", "mesh_param",
        "config_params",
    ]  # fmt: skip
    assert {n: p.default for n, p in params.items() if n != "distributed_port"} == dict.fromkeys(
        params.keys() - {"distributed_port"}
    )
    assert params["distributed_port"].default == 29500
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params.values())


def test_distributed_port_positional_reaches_init_distributed(monkeypatch):
    import ds_all
    import ds_all._initialize as init_mod

    seen = {}
    real = init_mod.init_distributed

    def spy(**kw):
        seen.update(kw)
        return real(**kw)

    monkeypatch.setattr(init_mod, "init_distributed", spy)
    model = nn.Linear(4, 4)
    # 7th positional: DeepSpeed's distributed_port (before, it landed in mpu)
    engine, *_ = ds_all.initialize(None, model, _sgd, None, None, None, 29517,
                                   config={"train_batch_size": 1}, dist_init_required=True)  # fmt: skip
    assert seen["distributed_port"] == 29517
    assert engine.mpu is None
    engine.destroy()


def test_mesh_param_world_of_one_and_bad_values():
    from ds_all._config_base import ConfigError

    engine = _init({}, mesh_param=(1, 1))
    assert engine.sequence_parallel_size == 1 and engine.dp_world_size == 1
    assert engine.seq_dp_world_size == 1
    engine.destroy()
    with pytest.raises(ConfigError, match='set "sequence_parallel_size"'):
        _init({}, mesh_param="dp=1,sp=1")
    with pytest.raises(ConfigError, match="pair of positive ints"):
        _init({}, mesh_param=(1, 0))


@distributed_test(world_size=[4])
def test_parallel_state_sp_module_is_deepspeeds_mpu(world_size):
    from ds_all.runtime.sequence_parallel import parallel_state_sp as mpu
    from ds_all.utils import groups

    with pytest.raises(RuntimeError, match="not initialized"):
        mpu.get_sequence_parallel_group()
    with pytest.raises(ValueError, match="greater than 1"):
        mpu.initialize_sequence_parallel(1)
    with pytest.raises(RuntimeError, match="not divisible"):
        mpu.initialize_sequence_parallel(3)
    mpu.initialize_sequence_parallel(2)
    rank = dist.get_rank()
    assert mpu.get_sequence_parallel_world_size() == 2
    assert mpu.get_sequence_parallel_rank() == rank % 2
    assert _ranks(mpu.get_sequence_parallel_group()) == [rank // 2 * 2, rank // 2 * 2 + 1]
    assert mpu.get_sequence_data_parallel_world_size() == 4
    assert mpu.get_sequence_data_parallel_rank() == rank
    # deepspeed.utils.groups reports the same groups
    assert groups._get_sequence_parallel_group() is mpu.get_sequence_parallel_group()
    with pytest.raises(RuntimeError, match="already initialized"):
        mpu.initialize_sequence_parallel(2)
    mpu._release_sequence_parallel_groups()
    assert groups._get_sequence_parallel_world_size() == 1
