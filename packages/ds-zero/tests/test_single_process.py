"""Tier 1: partition math, loss scaler, config, memory formulas, and the wrapper in one process."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from zero_helpers import assert_close_state, batch, make_model, make_optimizer

import ds_zero
from ds_zero._layout import make_layout, split_into_buckets


@given(
    numels=st.lists(st.integers(0, 500), min_size=1, max_size=8),
    world=st.integers(1, 8),
    align=st.sampled_from([1, 4, 16]),
)
def test_layout_shards_cover_every_element_once(numels, world, align):
    lay = make_layout(numels, world, align)
    assert lay.padded_numel % (world * align) == 0
    for i, n in enumerate(numels):
        assert lay.offsets[i] % align == 0
        covered = []
        for r in range(world):
            lo, hi = lay.shard_range(r)
            hit = lay.intersect(i, lo, hi)
            if hit is not None:
                p_off, r_off, k = hit
                assert lo + r_off == lay.offsets[i] + p_off
                covered.extend(range(p_off, p_off + k))
        assert covered == list(range(n))
        if n:
            owner = lay.owner_of_first_element(i)
            lo, hi = lay.shard_range(owner)
            assert lo <= lay.offsets[i] < hi
    for i in range(len(numels) - 1):  # no overlap between parameters
        assert lay.offsets[i] + numels[i] <= lay.offsets[i + 1]


def test_layout_rejects_bad_input():
    with pytest.raises(ValueError, match="world_size"):
        make_layout([3], 0)
    with pytest.raises(ValueError, match="sizes"):
        make_layout([-1], 2)


def test_split_into_buckets():
    assert split_into_buckets([5, 5, 5, 20, 1], 10) == [[0, 1], [2], [3], [4]]
    with pytest.raises(ValueError):
        split_into_buckets([1], 0)


def test_dynamic_loss_scaler_hysteresis_and_window():
    # DeepSpeed 0.19.8's update_scale: the scale grows when the clean steps counted after the
    # step following the last overflow reach a multiple of the window
    s = ds_zero.DynamicLossScaler(
        ds_zero.LossScaleOptions(initial_scale_power=4, loss_scale_window=3, hysteresis=2)
    )
    assert s.scale == 16
    s.update(True)  # first overflow is absorbed by hysteresis
    assert s.scale == 16 and s.hysteresis_left == 1
    s.update(True)
    assert s.scale == 8
    scales = []
    for _ in range(8):
        s.update(False)
        scales.append(s.scale)
    # stable intervals 0..7 after the overflow: doubling at 3 and 6 (the 4th and 7th clean step)
    assert scales == [8, 8, 8, 16, 16, 16, 32, 32]
    assert s.hysteresis_left == 2  # refilled when the scale grew
    restored = ds_zero.DynamicLossScaler(s.options)
    restored.load_state_dict(s.state_dict())
    assert restored.state_dict() == s.state_dict()
    # no overflow yet: the first growth comes at iteration == window (the 4th clean step)
    fresh = ds_zero.DynamicLossScaler(
        ds_zero.LossScaleOptions(initial_scale_power=0, loss_scale_window=3)
    )
    grown = []
    for _ in range(7):
        fresh.update(False)
        grown.append(fresh.scale)
    assert grown == [1, 1, 1, 2, 2, 2, 4]


def test_dynamic_loss_scaler_consecutive_hysteresis():
    def run(consecutive):
        s = ds_zero.DynamicLossScaler(
            ds_zero.LossScaleOptions(
                initial_scale_power=6,
                loss_scale_window=100,
                hysteresis=2,
                consecutive_hysteresis=consecutive,
            )
        )
        out = []
        for overflow in (True, False, True, False, True, True):
            s.update(overflow)
            out.append((s.scale, s.hysteresis_left))
        return out

    # without it hysteresis is only refilled when the scale grows: isolated overflows add up
    assert run(False) == [(64, 1), (64, 1), (32, 1), (32, 1), (16, 1), (8, 1)]
    # with it every clean step refills hysteresis: only back-to-back overflows halve the scale
    assert run(True) == [(64, 1), (64, 2), (64, 1), (64, 2), (64, 1), (32, 1)]


def test_loss_scaler_floor_and_validation():
    opts = {"initial_scale_power": 1, "hysteresis": 1, "min_loss_scale": 1.0}
    s = ds_zero.DynamicLossScaler(ds_zero.LossScaleOptions(**opts, raise_error_at_min_scale=False))
    for _ in range(5):
        s.update(True)
    assert s.scale == 1.0
    # DeepSpeed's default: an overflow with the scale already at the floor ends the run
    s = ds_zero.DynamicLossScaler(ds_zero.LossScaleOptions(**opts))
    s.update(True)
    assert s.scale == 1.0
    with pytest.raises(FloatingPointError, match="min_loss_scale=1"):
        s.update(True)
    with pytest.raises(ValueError, match="hysteresis"):
        ds_zero.LossScaleOptions(hysteresis=0)


def test_config_accepts_deepspeed_keys_and_suggests_fixes():
    cfg = ds_zero.ZeroConfig.model_validate(
        {
            "stage": 3,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_bucket_size": 5e8,
            "allgather_bucket_size": 5e8,
            "reduce_scatter": True,
            "stage3_prefetch_bucket_size": 1000,
            "stage3_param_persistence_threshold": 10,
            "stage3_max_live_parameters": 99,
            "stage3_max_reuse_distance": 7,
            "stage3_gather_fp16_weights_on_model_save": True,
            "offload_optimizer": {"device": "cpu", "pin_memory": True},
        }
    )
    assert cfg.stage3_gather_16bit_weights_on_model_save
    assert cfg.offload_optimizer == {"device": "cpu", "pin_memory": True}
    opts = cfg.to_options(param_dtype=torch.bfloat16, gradient_clipping=1.0)
    assert (opts.stage, opts.reduce_bucket_size, opts.prefetch_bucket_size) == (
        3,
        500_000_000,
        1000,
    )
    assert (opts.param_persistence_threshold, opts.max_live_parameters) == (10, 99)
    assert opts.max_reuse_distance == 7 and opts.gradient_clipping == 1.0
    with pytest.raises(ValueError, match="did you mean 'reduce_bucket_size'"):
        ds_zero.ZeroConfig.model_validate({"reduce_bucket_sise": 1})
    # removed from DeepSpeed 0.19.8, which refuses them at any value (its old defaults included)
    for key, value in (
        ("mics_shard_size", 4),
        ("mics_shard_size", -1),
        ("mics_hierarchical_params_gather", False),
        ("zeropp_loco_param", {"err_beta": 0.8}),
    ):
        with pytest.raises(ValueError, match=f"{key}: .*removed.*remove the key"):
            ds_zero.ZeroConfig.model_validate({key: value})
    # qgZ is a quantized reduce-scatter: DeepSpeed asserts reduce_scatter with it
    with pytest.raises(ValueError, match="zero_quantized_gradients needs .*reduce_scatter"):
        ds_zero.ZeroConfig.model_validate(
            {"stage": 3, "zero_quantized_gradients": True, "reduce_scatter": False}
        )
    ds_zero.ZeroConfig.model_validate({"stage": 3, "reduce_scatter": False})
    with pytest.raises(ValueError, match="stage"):
        ds_zero.ZeroConfig.model_validate({"stage": 4})


# Every key of DeepSpeed 0.19.8's DeepSpeedZeroConfig (aliases where it has them) with its
# default value: a DeepSpeed config spelled out in full must be accepted unchanged.
DEEPSPEED_0_19_8_ZERO_DEFAULTS = {
    "stage": 0,
    "contiguous_gradients": True,
    "reduce_scatter": True,
    "reduce_bucket_size": 500_000_000,
    "use_multi_rank_bucket_allreduce": True,
    "allgather_partitions": True,
    "allgather_bucket_size": 500_000_000,
    "overlap_comm": None,
    "compute_grad_norm": True,
    "load_from_fp32_weights": True,
    "elastic_checkpoint": False,
    "offload_param": None,
    "offload_optimizer": None,
    "zenflow": None,
    "sub_group_size": 1_000_000_000,
    "cpu_offload_param": None,
    "cpu_offload_use_pin_memory": None,
    "cpu_offload": None,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_param_persistence_threshold": 100_000,
    "stage3_model_persistence_threshold": 2**63 - 1,
    "stage3_max_live_parameters": 1_000_000_000,
    "stage3_max_reuse_distance": 1_000_000_000,
    "stage3_gather_16bit_weights_on_model_save": False,
    "stage3_module_granularity_threshold": 0,
    "stage3_use_all_reduce_for_fetch_params": False,
    "stage3_allgather_sequential": False,
    "stage3_gather_fp16_weights_on_model_save": False,
    "ignore_unused_parameters": True,
    "legacy_stage1": False,
    "round_robin_gradients": False,
    "parameter_alignment": False,
    "zero_hpz_partition_size": 1,
    "zero_quantized_weights": False,
    "zero_quantized_nontrainable_weights": False,
    "zero_quantized_gradients": False,
    "memory_efficient_linear": True,
    "pipeline_loading_checkpoint": False,
    "override_module_apply": True,
    "log_trace_cache_warnings": False,
    "enable_sanity_checks": False,
    "save_muon_momentum_buffer_in_memory": False,
    "leaf_module": {"classes": [], "names": [], "name_suffixes": []},
}


def test_config_accepts_every_deepspeed_key_and_field_name():
    full = dict(DEEPSPEED_0_19_8_ZERO_DEFAULTS, overlap_comm=True)  # null is not valid JSON here
    cfg = ds_zero.ZeroConfig.model_validate(full)
    assert cfg.stage3_model_persistence_threshold == 2**63 - 1
    # DeepSpeed's pydantic field names (populate_by_name) mean the same as the aliases
    by_name = ds_zero.ZeroConfig.model_validate(
        {
            "stage": 3,
            "prefetch_bucket_size": 11,
            "param_persistence_threshold": 12,
            "model_persistence_threshold": 13,
            "max_live_parameters": 14,
            "max_reuse_distance": 15,
            "gather_16bit_weights_on_model_save": True,
            "module_granularity_threshold": 0,
            "use_all_reduce_for_fetch_params": False,
            "allgather_sequential": False,
        }
    )
    opts = by_name.to_options()
    assert (opts.prefetch_bucket_size, opts.param_persistence_threshold) == (11, 12)
    assert (opts.model_persistence_threshold, opts.max_live_parameters) == (13, 14)
    assert opts.max_reuse_distance == 15 and by_name.stage3_gather_16bit_weights_on_model_save
    with pytest.raises(ValueError, match="leaf_module must be a JSON object"):
        ds_zero.ZeroConfig.model_validate({"leaf_module": "my.Block"})
    with pytest.raises(ValueError, match="clases"):  # a misspelt sub-key is refused
        ds_zero.ZeroConfig.model_validate({"leaf_module": {"clases": ["my.Block"]}})
    with pytest.raises(ValueError, match="cpu_offload_param is DeepSpeed's deprecated"):
        ds_zero.ZeroConfig.model_validate({"cpu_offload_param": True})
    with pytest.raises(ValueError, match="not supported by ds-zero"):
        ds_zero.ZeroConfig.model_validate({"zenflow": {"topk_ratio": 0.1}})
    with pytest.raises(ValueError, match="did you mean 'leaf_module'"):
        ds_zero.ZeroConfig.model_validate({"leaf_modules": {}})


def test_leaf_module_section_has_deepspeeds_defaults_and_coercions():
    # DeepSpeed 0.19.8's defaults: Hugging Face's three sparse MoE blocks are leaves unasked
    default = ds_zero.ZeroConfig.model_validate({}).leaf_module
    assert default.classes == [
        "transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock",
        "transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock",
        "transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock",
    ]
    assert default.names == [] and default.name_suffixes == []
    assert ds_zero.ZeroConfig.model_validate({"leaf_module": None}).leaf_module == default
    given = ds_zero.ZeroConfig.model_validate(
        {
            "leaf_module": {
                "classes": "my.Block",
                "names": ["a.b", "a.b", "c"],
                "name_suffixes": "moe",
            }
        }
    ).leaf_module  # a string is a one-element list; repeats are dropped, order kept
    assert given.classes == ["my.Block"] and given.names == ["a.b", "c"]
    assert given.name_suffixes == ["moe"]
    assert (
        ds_zero.ZeroConfig.model_validate({"leaf_module": {"classes": []}}).leaf_module.classes
        == []
    )


def _step_beside(zero, ref: nn.Module, ref_opt: torch.optim.Optimizer, steps: int) -> None:
    """``steps`` single-rank steps of ``zero`` and of the plain reference on the same batches."""
    for s in range(steps):
        x, y = batch(s, 0, 0)
        zero.backward(zero(x, y))
        assert zero.step()
        ref(x, y).backward()
        ref_opt.step()
        ref_opt.zero_grad()


def test_leaf_module_is_one_unit_and_its_parameters_point_at_it():
    # a flagged module (DeepSpeed's _z3_leaf) is gathered whole: no unit below it, and stage 3
    # points each of its parameters at it (ds_z3_leaf_module), the outermost leaf winning
    model = nn.Sequential(
        nn.ModuleList([nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))]),
        nn.Linear(4, 2),
    )
    leaf, nested = model[0][1], model[0][1][0]
    leaf._z3_leaf = nested._z3_leaf = True
    zero = ds_zero.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1),
                        ds_zero.ZeroOptions(stage=3, param_persistence_threshold=0))  # fmt: skip
    assert {id(u) for u in zero._units} == {id(model), id(model[0][0]), id(leaf)}
    for p in leaf.parameters():
        assert p.ds_z3_leaf_module is leaf
    assert getattr(model[1].weight, "ds_z3_leaf_module", None) is None


def test_model_persistence_threshold_bounds_whole_parameters():
    """DeepSpeed's stage3_model_persistence_threshold: small parameters stay whole only while
    their running total (registration order) fits; the rest are partitioned, training is
    unchanged."""
    kw = {"tied": True, "frozen": True}
    ref = make_model(**kw)
    ref_opt = make_optimizer(ref)
    small = [p.numel() for p in ref.parameters() if p.numel() <= 40]
    bound = sum(small[:3])
    model = make_model(**kw)
    zero = ds_zero.wrap(
        model,
        make_optimizer(model),
        ds_zero.ZeroOptions(
            stage=3, param_persistence_threshold=40, model_persistence_threshold=bound
        ),
    )
    whole = [p for b in zero.buckets if not b.shard_params for p in b.params]
    whole += zero._unbucketed
    assert sum(p.numel() for p in whole) == bound and len(whole) == 3
    _step_beside(zero, ref, ref_opt, steps=2)
    assert_close_state(zero.full_state_dict(), ref.state_dict(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="model_persistence_threshold"):
        ds_zero.ZeroOptions(model_persistence_threshold=-1)


def test_options_validation():
    with pytest.raises(ValueError, match="stage"):
        ds_zero.ZeroOptions(stage=5)
    with pytest.raises(ValueError, match="param_dtype"):
        ds_zero.ZeroOptions(param_dtype=torch.int8)


def test_memory_estimate_matches_paper_for_mixed_precision_adam():
    psi, n = 7_500_000_000, 64  # the paper's example: 7.5B params on 64 GPUs
    est = {
        s: ds_zero.memory_estimate(psi, s, n, param_dtype=torch.float16, optimizer_state_bytes=8)
        for s in range(4)
    }
    # paper (K=12, fp16 grads): 120 GB, 31.4 GB, 16.6 GB, 1.9 GB; ours holds fp32 reduced grads
    # (4 bytes instead of 2) and, at stage 3, no fp16 shard besides the fp32 master
    assert est[0].total == (2 + 4 + 12) * psi
    assert math.isclose(est[1].total, 2 * psi + (4 + 12) * psi / n, rel_tol=1e-9)
    assert math.isclose(est[2].total, 2 * psi + (4 + 12) * psi / n, rel_tol=1e-9)
    assert math.isclose(est[3].total, (4 + 12) * psi / n, rel_tol=1e-9)
    with pytest.raises(ValueError):
        ds_zero.memory_estimate(psi, 4, n)


def test_fragment_validation():
    t = torch.zeros(3)
    f = ds_zero.Fragment("w", (2, 3), torch.float32, 2, 3, t)
    assert f.numel == 3
    with pytest.raises(ValueError, match="outside"):
        ds_zero.Fragment("w", (2, 3), torch.float32, 4, 3, t)
    with pytest.raises(ValueError, match="1-D"):
        ds_zero.Fragment("w", (2, 3), torch.float32, 0, 3, torch.zeros(1, 3))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_single_rank_matches_plain_training(stage):
    kw = {"tied": True, "twice": True, "frozen": True}
    ref = make_model(**kw)
    ref_opt = make_optimizer(ref)
    model = make_model(**kw)
    zero = ds_zero.wrap(
        model,
        make_optimizer(model),
        ds_zero.ZeroOptions(stage=stage, reduce_bucket_size=300, param_persistence_threshold=40),
    )
    for s in range(3):
        x, y = batch(s, 0, 0)
        loss = zero(x, y)
        zero.backward(loss)
        assert zero.step()
        ref_loss = ref(x, y)
        ref_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    assert_close_state(zero.full_state_dict(), ref.state_dict(), rtol=1e-6, atol=1e-7)
    if stage == 3:
        assert zero.module.blocks[0].fc1.weight.untyped_storage().size() == 0
        assert zero.buckets[0].state is ds_zero.ParamsState.SHARDED


def test_wrap_errors_name_the_parameter():
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD([model.weight], lr=0.1)
    with pytest.raises(ValueError, match="'bias' requires grad but is not in the optimizer"):
        ds_zero.wrap(model, opt)
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not a parameter of the model"):
        ds_zero.wrap(nn.Linear(2, 2), other)
    expert = nn.Linear(2, 2)
    expert.weight.ds_expert = True
    with pytest.raises(ValueError, match="ds_expert_dp_group"):
        ds_zero.wrap(expert, torch.optim.SGD(expert.parameters(), lr=0.1))


def test_custom_stepper_protocol_is_used():
    calls = []

    class SGDStepper:
        masters_on_device = True

        def setup(self, partitions, group_options):
            self.parts = list(partitions)
            calls.append(("setup", len(self.parts), group_options))

        def grad_ready(self, index, grad):
            calls.append(("ready", index))

        def step(self, grads):
            for part, g in zip(self.parts, grads):
                part.master.add_(g, alpha=-0.1)
                if part.param_shard is not None:
                    part.param_shard.copy_(part.master)
            calls.append(("step",))

        def state_tensors(self, index):
            return {"master": self.parts[index].master}

        def state_loaded(self):
            pass

    assert isinstance(SGDStepper(), ds_zero.PartitionStepper)
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    ref = nn.Linear(4, 3)
    ref.load_state_dict(model.state_dict())
    zero = ds_zero.wrap(model, None, ds_zero.ZeroOptions(stage=2), stepper=SGDStepper())
    x = torch.randn(5, 4)
    zero.backward(zero(x).sum())
    zero.step()
    ref(x).sum().backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.1 * p.grad
    assert_close_state(zero.full_state_dict(), ref.state_dict(), rtol=1e-6, atol=1e-7)
    assert calls[0][0] == "setup" and ("step",) in calls and ("ready", 0) in calls


@pytest.mark.parametrize("stage", [1, 3])
def test_load_full_state_dict_round_trip(stage):
    src = make_model(seed=1, tied=True, frozen=True)
    want = {k: v.detach().clone() for k, v in src.state_dict().items()}
    model = make_model(seed=0, tied=True, frozen=True)
    zero = ds_zero.wrap(
        model,
        make_optimizer(model),
        ds_zero.ZeroOptions(
            stage=stage, param_dtype=torch.bfloat16, param_persistence_threshold=40
        ),
    )
    zero.load_full_state_dict(want)
    # trainable weights come back from the fp32 masters exactly; frozen ones live in bf16
    frozen = {"pos.weight", "blocks.0.fc2.bias"}
    expect = {k: v.bfloat16().float() if k in frozen else v for k, v in want.items()}
    assert_close_state(zero.full_state_dict(), expect, rtol=0, atol=0)
    x, y = batch(0, 0, 0)
    ref_loss = src.to(torch.bfloat16)(x, y)
    torch.testing.assert_close(zero(x, y), ref_loss, rtol=1e-2, atol=0)
    with pytest.raises(KeyError, match="missing keys"):
        zero.load_full_state_dict({})


def _stage3_trace(**opts):
    """Bucket states seen from inside each block's forward, after it, and after backward."""
    model = make_model(layers=3)
    zero = ds_zero.wrap(
        model,
        make_optimizer(model),
        ds_zero.ZeroOptions(stage=3, param_persistence_threshold=40, **opts),
    )
    blocks = list(model.blocks)

    def gathered(unit):
        states = {b.state for b in zero.unit_buckets[unit]}
        assert len(states) == 1, states
        return states.pop() is not ds_zero.ParamsState.SHARDED

    trace = []
    for i, blk in enumerate(blocks):
        nxt = blocks[i + 1] if i + 1 < len(blocks) else None

        def pre(module, args, i=i, nxt=nxt):
            live = zero.scheduler.live_numel()
            trace.append(("in", i, gathered(blocks[i]), nxt is not None and gathered(nxt), live))

        def post(module, args, out, i=i):
            trace.append(("after", i, gathered(blocks[i])))

        blk.register_forward_pre_hook(pre)  # runs after ZeRO's own hooks on the same module
        blk.register_forward_hook(post)
    for s in range(2):  # the first forward records the order that prefetching follows
        trace.clear()
        x, y = batch(s, 0, 0)
        zero.backward(zero(x, y))
        zero.step()
    after_backward = [gathered(b) for b in blocks]
    root, block = (
        sum(b.layout.padded_numel for b in zero.unit_buckets[u]) for u in (model, blocks[0])
    )
    zero.close()
    return trace, after_backward, (root, block)


def test_stage3_prefetch_release_and_live_parameter_bound():
    trace, after_backward, numel = _stage3_trace()
    ins = [t for t in trace if t[0] == "in"]
    afters = [t for t in trace if t[0] == "after"]
    assert all(t[2] for t in ins)  # a block's parameters are whole while it runs
    assert [t[3] for t in ins] == [True, True, False]  # the next block is already prefetched
    # released after use, except the last block of forward (reused at once by backward)
    assert [t[2] for t in afters] == [False, False, True]
    assert after_backward == [False, False, False]
    # max_live_parameters: root + one block fit, so no prefetch of the next block
    bound = sum(numel)
    trace, _, _ = _stage3_trace(max_live_parameters=bound)
    ins = [t for t in trace if t[0] == "in"]
    assert [t[3] for t in ins] == [False, False, False]
    assert all(t[4] <= bound for t in ins)
    # prefetch_bucket_size 0 disables prefetch; max_reuse_distance 0 releases the last block
    trace, _, _ = _stage3_trace(prefetch_bucket_size=0, max_reuse_distance=0)
    assert [t[3] for t in trace if t[0] == "in"] == [False, False, False]
    assert [t[2] for t in trace if t[0] == "after"] == [False, False, False]


def _optimizers():
    out = {
        "sgd-nesterov": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
        "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.05),
        "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.5),
        "adamax": lambda ps: torch.optim.Adamax(ps, lr=1e-2),
        "nadam": lambda ps: torch.optim.NAdam(ps, lr=1e-2),
        "radam": lambda ps: torch.optim.RAdam(ps, lr=1e-2, weight_decay=0.1),
        "rprop": lambda ps: torch.optim.Rprop(ps, lr=1e-2),
    }
    try:
        import ds_kernels
    except ImportError:  # a test-only dependency (the test extra installs it)
        return out
    out["ds_kernels.FusedAdam"] = lambda ps: ds_kernels.FusedAdam(ps, lr=1e-2, weight_decay=0.1)
    out["ds_kernels.FusedLion"] = lambda ps: ds_kernels.FusedLion(ps, lr=1e-3)
    return out


@pytest.mark.filterwarnings("ignore:ds_kernels op")  # the pure-PyTorch fallback without Triton
@pytest.mark.parametrize("name", list(_optimizers()))
def test_any_elementwise_optimizer_trains_like_plain_training(name):
    """The default stepper hands the optimizer flat fp32 master partitions: element-wise
    optimizers (torch's and ds-kernels') then give the same result as on the model itself."""
    make = _optimizers()[name]
    for stage in (1, 3):
        ref = make_model(tied=True)
        ref_opt = make(list(ref.parameters()))
        model = make_model(tied=True)
        zero = ds_zero.wrap(
            model,
            make(list(model.parameters())),
            ds_zero.ZeroOptions(
                stage=stage, reduce_bucket_size=300, param_persistence_threshold=40
            ),
        )
        _step_beside(zero, ref, ref_opt, steps=3)
        assert_close_state(zero.full_state_dict(), ref.state_dict(), rtol=1e-5, atol=1e-6)
        zero.close()


def test_init_never_holds_more_than_one_module_whole():
    """Inside Init a module's parameters are whole only until its own __init__ returns: when
    each new layer starts, every earlier layer is already partitioned (world of 1: the shard
    is a separate tensor, the module's own storage is freed)."""
    made: list[torch.Tensor] = []
    whole_at_start: list[int] = []

    class Layer(nn.Linear):
        def __init__(self) -> None:
            whole_at_start.append(sum(p.untyped_storage().size() for p in made))
            super().__init__(64, 64)
            made.extend(self.parameters())

    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(Layer() for _ in range(6))
            self.out = nn.Linear(64, 3)

    torch.manual_seed(0)
    plain = Stack()
    made.clear()
    whole_at_start.clear()
    torch.manual_seed(0)
    with ds_zero.Init():
        model = Stack()
    assert whole_at_start == [0] * 6
    assert all(p.untyped_storage().size() == 0 for p in model.parameters())
    # the partitions hold exactly the values an unpartitioned build gets
    with ds_zero.GatheredParameters(list(model.parameters())):
        for (n, p), q in zip(model.named_parameters(), plain.parameters()):
            assert torch.equal(p, q), n


class _DictShardStore:
    """A ParamShardStore in a dict, recording every call."""

    def __init__(self) -> None:
        self.values: dict[int, torch.Tensor] = {}
        self.calls: list[tuple[str, int]] = []
        self.held: set[int] = set()

    def add(self, key, values):
        self.calls.append(("add", key))
        self.values[key] = values.detach().to("cpu", copy=True).reshape(-1)

    def acquire(self, key):
        self.calls.append(("acquire", key))
        assert key not in self.held
        self.held.add(key)
        return self.values[key]

    def release(self, key, ready=None):
        self.calls.append(("release", key))
        self.held.remove(key)

    def write(self, key, values):
        self.calls.append(("write", key))
        assert key not in self.held
        self.values[key].copy_(values.reshape(-1))

    def flush(self):
        self.calls.append(("flush", -1))

    def close(self):
        self.calls.append(("close", -1))


class _HostSGDStepper:
    """Off-device masters (like an offload stepper): SGD on host copies; hands updated values to
    ``param_writer`` where ZeRO set one, else writes ``param_shard``."""

    masters_on_device = False

    def setup(self, partitions, group_options):
        self.parts = list(partitions)
        self.host = [p.master.detach().to("cpu", copy=True) for p in self.parts]

    def grad_ready(self, index, grad):
        pass

    def step(self, grads):
        for part, host, g in zip(self.parts, self.host, grads):
            host.add_(g.to("cpu"), alpha=-0.1)
            if part.param_writer is not None:
                part.param_writer(host)
            elif part.param_shard is not None:
                part.param_shard.copy_(host)

    def state_tensors(self, index):
        return {"master": self.host[index]}

    def state_loaded(self):
        for part, host in zip(self.parts, self.host):
            if part.param_writer is not None:
                part.param_writer(host)


def test_stage3_param_shard_store_holds_the_shards():
    store = _DictShardStore()
    assert isinstance(store, ds_zero.ParamShardStore)
    model, ref = make_model(), make_model()
    opts = ds_zero.ZeroOptions(stage=3, param_persistence_threshold=0, host_param_shards=True)
    zero = ds_zero.wrap(model, None, opts, stepper=_HostSGDStepper(), param_store=store)
    stored = [b for b in zero.trainable if b.shard_store is store]
    assert stored and all(b.local_shard is None for b in stored)
    assert sorted(k for c, k in store.calls if c == "add") == [b.index for b in stored]
    for s in range(3):
        x, y = batch(s, 0, 0)
        zero.backward(zero(x, y))
        assert zero.step()
        ref(x, y).backward()
        with torch.no_grad():
            for p in ref.parameters():
                p -= 0.1 * p.grad
                p.grad = None
    assert_close_state(zero.full_state_dict(), ref.state_dict(), rtol=1e-6, atol=1e-6)
    names = [c for c, _ in store.calls]
    assert names.count("acquire") == names.count("release") > 0 and not store.held
    assert names.count("write") == 3 * len(stored) and names.count("flush") == 3
    # a consolidated load goes to the stepper's masters and, through param_writer, the store
    start = make_model().state_dict()
    zero.load_full_state_dict(start)
    for b in stored:
        lo, hi = b.layout.shard_range(b.rank)
        for i, name in enumerate(b.names):
            p_off, t_off, n = b.layout.intersect(i, lo, hi)
            got = store.values[b.index][t_off : t_off + n]
            assert torch.equal(got, start[name].reshape(-1)[p_off : p_off + n]), name
    zero.close()
    assert store.calls[-1] == ("close", -1)
    with pytest.raises(ValueError, match="param_store holds stage-3 parameter shards"):
        ds_zero.wrap(make_model(), None, ds_zero.ZeroOptions(stage=2),
                     stepper=_HostSGDStepper(), param_store=_DictShardStore())  # fmt: skip


def test_param_shard_store_is_unused_when_masters_stay_on_the_device():
    store = _DictShardStore()
    model = make_model()
    opts = ds_zero.ZeroOptions(stage=3, param_persistence_threshold=0)
    zero = ds_zero.wrap(model, make_optimizer(model), opts, param_store=store)
    assert all(b.shard_store is None for b in zero.buckets)  # gathers read the master
    x, y = batch(0, 0, 0)
    zero.backward(zero(x, y))
    zero.step()
    assert [c for c, _ in store.calls if c != "flush"] == []


def test_offload_style_stepper_gets_gradients_during_backward_and_the_factor_in_step():
    """A stepper with ``accepts_grad_scale`` (ds-offload's) receives each partition's final
    gradient from inside backward (early_copy=True), unscaled, and the clip factor in step."""
    events: list[tuple[str, int | None]] = []

    class ScaledSGD(_HostSGDStepper):
        accepts_grad_scale = True

        def grad_ready(self, index, grad, early_copy=False):
            events.append(("ready" if early_copy else "late", index))

        def step(self, grads, grad_scale=None):
            events.append(("step", None))
            factor = 1.0 if grad_scale is None else float(grad_scale)
            super().step([g * factor for g in grads])

    model, ref = make_model(), make_model()
    opts = ds_zero.ZeroOptions(stage=2, gradient_clipping=0.05, reduce_bucket_size=2000)
    zero = ds_zero.wrap(model, None, opts, stepper=ScaledSGD())
    ref_params = list(ref.parameters())
    for s in range(3):
        x, y = batch(s, 0, 0)
        events.clear()
        zero.backward(zero(x, y))
        during = [e for e in events if e[0] == "ready"]
        assert len(during) == len(zero.trainable) > 1  # all inside backward, before step()
        assert zero.step()
        assert zero.grad_norm > 0.05  # clipping is active: the factor matters
        assert events[-1] == ("step", None) and not any(e[0] == "late" for e in events)
        ref(x, y).backward()
        torch.nn.utils.clip_grad_norm_(ref_params, 0.05)
        with torch.no_grad():
            for p in ref_params:
                p -= 0.1 * p.grad
                p.grad = None
    assert_close_state(zero.full_state_dict(), ref.state_dict(), rtol=1e-5, atol=1e-6)
