"""The autotuner's parts in one process: settings, space, estimator, tuner, argv, chart."""

from __future__ import annotations

import struct
import zlib

import pytest

from ds_profile.autotune import (
    AutotuneConfigError,
    AutotuneSettings,
    Candidate,
    Job,
    ModelFacts,
    enumerate_space,
    fallbacks,
    order,
    prune,
    required_bytes,
    search,
    trial_config,
)
from ds_profile.autotune._png import bar_chart_png
from ds_profile.autotune._trials import script_overrides


def test_deepspeed_defaults():
    s = AutotuneSettings.from_config({})
    assert (s.enabled, s.fast, s.results_dir, s.exps_dir, s.overwrite) == (False, True, "autotuning_results",
                                                                           "autotuning_exps", True)  # fmt: skip
    assert (s.start_profile_step, s.end_profile_step, s.metric, s.tuner_type) == (
        3,
        5,
        "throughput",
        "gridsearch",
    )
    assert (s.tuner_early_stopping, s.tuner_num_trials, s.num_tuning_micro_batch_sizes) == (
        5,
        50,
        3,
    )
    assert (
        s.max_train_micro_batch_size_per_gpu,
        s.min_train_micro_batch_size_per_gpu,
        s.mp_size,
    ) == (1024, 1, 1)


@pytest.mark.parametrize(
    "raw,match",
    [
        ({"metrc": "latency"}, "autotuning.metrc: unknown key; did you mean 'metric'"),
        ({"metric": "speed"}, "autotuning.metric: expected latency or throughput or flops"),
        ({"tuner_type": "bayes"}, "autotuning.tuner_type"),
        ({"fast": 1}, "autotuning.fast: expected true or false"),
        (
            {"tuner_num_trials": 0},
            "autotuning.tuner_num_trials: expected a whole number of at least 1",
        ),
        (
            {"start_profile_step": 4, "end_profile_step": 4},
            "end_profile_step \\(4\\) must be after.*set autotuning.end_profile_step above 4",
        ),
        ({"zero_stages": [0, 4]}, "autotuning.zero_stages"),
        ({"offload": ["nvme"]}, "autotuning.offload"),
        (
            {"mp_size": 2},
            "autotuning.mp_size: only 1 is supported, got 2.*set autotuning.mp_size to 1",
        ),
        ({"arg_mappings": {"train_micro_batch_size_per_gpu": 3}}, "autotuning.arg_mappings"),
        ({"model_info": {"profile": True, "layers": 3}}, "autotuning.model_info.layers"),
        ({"memory_per_device_gb": -1}, "autotuning.memory_per_device_gb"),
    ],
)
def test_bad_settings(raw, match):
    with pytest.raises(AutotuneConfigError, match=match):
        AutotuneSettings.from_config(raw)


def test_deepspeed_keys_accepted_with_warnings():
    """DeepSpeed 0.19.8 accepts model_info null, start_step/end_step (shown in its
    AUTOTUNING_FORMAT, never read) and keys this tuner does not use: accepted, with a warning
    naming each key."""
    import warnings

    assert AutotuneSettings.from_config({"model_info": None}).model_info.profile is False
    cases = [
        ({"start_step": 5}, r"autotuning.start_step has no effect.*autotuning.start_profile_step"),
        ({"end_step": 15}, r"autotuning.end_step has no effect.*autotuning.end_profile_step"),
        ({"min_train_batch_size": 4}, r"autotuning.min_train_batch_size has no effect"),
        ({"num_tuning_micro_batch_sizes": 5}, r"autotuning.num_tuning_micro_batch_sizes has no"),
        ({"model_info": {"num_params": 10}}, r"autotuning.model_info.num_params has no effect"),
        ({"model_info": {"hidden_size": 8}}, r"autotuning.model_info.hidden_size has no effect"),
        ({"model_info": {"num_layers": 2}}, r"autotuning.model_info.num_layers has no effect"),
    ]
    for raw, match in cases:
        with pytest.warns(UserWarning, match=match):
            s = AutotuneSettings.from_config(raw)
    assert (s.start_profile_step, s.end_profile_step) == (3, 5)
    with pytest.warns(UserWarning, match="start_step"):
        s = AutotuneSettings.from_config({"start_step": 5, "end_step": 15, "start_profile_step": 2,
                                          "end_profile_step": 4})  # fmt: skip
    assert (s.start_profile_step, s.end_profile_step) == (2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AutotuneSettings.from_config({"model_info": {"profile": True}, "max_train_batch_size": 8})


def test_space_keeps_global_batch_and_skips_impossible_offloads():
    s = AutotuneSettings.from_config({"activation_checkpointing_arg": "--ckpt"})
    space = enumerate_space(s, batch=16, world=2)
    assert all(c.micro_batch * c.grad_accum * 2 == 16 for c in space)
    assert {c.micro_batch for c in space} == {1, 2, 4, 8}
    assert not any(c.stage == 0 and c.offload != "none" for c in space)
    assert not any(c.offload == "optimizer+param" and c.stage != 3 for c in space)
    # 4 micro-batches x 2 checkpointing x (z0 + z1 2 offloads + z2 2 + z3 3)
    assert len(space) == 4 * 2 * 8
    with pytest.raises(ValueError, match="not divisible"):
        enumerate_space(s, batch=7, world=2)


def test_trial_config():
    s = AutotuneSettings.from_config({})
    user = {
        "train_batch_size": 16,
        "zero_optimization": {"stage": 0, "overlap_comm": True},
        "bf16": {"enabled": True},
    }
    cfg = trial_config(user, Candidate(3, "optimizer+param", 2, 4, False), 2, s, "/m.json")
    assert (
        cfg["train_batch_size"],
        cfg["train_micro_batch_size_per_gpu"],
        cfg["gradient_accumulation_steps"],
    ) == (16, 2, 4)
    z = cfg["zero_optimization"]
    assert z["stage"] == 3 and z["overlap_comm"] is True
    assert z["offload_optimizer"]["device"] == z["offload_param"]["device"] == "cpu"
    assert cfg["autotuning"] == {"enabled": True, "start_profile_step": 3, "end_profile_step": 5,
                                 "metric_path": "/m.json"}  # fmt: skip
    assert user["zero_optimization"] == {"stage": 0, "overlap_comm": True}  # not mutated


def test_estimator_follows_deepspeed_accounting():
    facts = ModelFacts(num_params=1000, activation_bytes_per_sample=100, checkpointed_activation_bytes_per_sample=10,
                       half_precision=True, device_memory_bytes=0)  # fmt: skip
    margin = 1.15

    def need(stage, offload="none", mbs=1, ac=False):
        return required_bytes(Candidate(stage, offload, mbs, 1, ac), facts, 4)

    assert need(0) == int(margin * (2000 + 2000 + 16000 + 100))
    assert need(1) == int(margin * (2000 + 2000 + 4000 + 100))
    assert need(2) == int(margin * (2000 + 500 + 4000 + 100))
    assert need(3) == int(margin * (500 + 500 + 4000 + 100))
    assert need(2, "optimizer") == int(margin * (2000 + 500 + 100))
    assert need(3, "optimizer+param", mbs=4, ac=True) == int(margin * (500 + 40))


def test_prune_and_order_one_device():
    facts = ModelFacts(1000, 100, None, True, 0)
    feasible = [Candidate(st, off, m, 8 // m, False) for st in (0, 1, 2) for off in ("none", "optimizer")
                for m in (1, 2, 4) if not (st == 0 and off != "none")]  # fmt: skip

    def need(c):
        return required_bytes(c, facts, 1)

    kept = prune(feasible, 1, need)
    # one device: ZeRO 1/2 save nothing over stage 0; offload only buys memory; a smaller
    # micro-batch of the same configuration (global batch kept) only buys memory too
    z0 = {m: Candidate(0, "none", m, 8 // m, False) for m in (1, 2, 4)}
    assert kept == [z0[4]]
    # ... so the smaller micro-batches wait as fallbacks, each run only if all larger failed
    backup = fallbacks(feasible, kept, 1, need)
    assert backup[z0[2]] == (z0[4],) and backup[z0[1]] == (z0[4], z0[2])
    s = AutotuneSettings.from_config({"tuner_type": "model_based"})
    assert [c.micro_batch for c in order([z0[1], z0[2], z0[4]], s, 1)] == [4, 2, 1]
    ran = search(order(kept, s, 1), s, {z0[2]: 3.0, z0[1]: 2.0}.get, fallback_of=backup)
    assert [(o.candidate.micro_batch, o.value) for o in ran] == [(4, None), (2, 3.0)]


def test_search_early_stopping_and_failures():
    s = AutotuneSettings.from_config({"tuner_early_stopping": 2})
    cands = [Candidate(0, "none", m, 1, False) for m in range(1, 10)]
    values = {1: 5.0, 2: None, 3: 9.0, 4: 8.0, 5: 7.0, 6: 100.0}
    ran = search(cands, s, lambda c: values.get(c.micro_batch))
    assert [o.candidate.micro_batch for o in ran] == [1, 2, 3, 4, 5]  # two without a gain after 9.0
    s = AutotuneSettings.from_config({"metric": "latency", "tuner_num_trials": 3})
    assert len(search(cands, s, lambda c: 1.0)) == 3


def test_job_argv_replaces_config_and_maps_args():
    job = Job(
        ("--num_gpus=2",),
        "train.py",
        ("--deepspeed", "old.json", "--per_device_train_batch_size", "8"),
    )
    assert job.config_path() == "old.json"
    s = AutotuneSettings.from_config({"arg_mappings": {"train_micro_batch_size_per_gpu": "--per_device_train_batch_size",
                                                       "gradient_accumulation_steps": "--gas"},
                                      "activation_checkpointing_arg": "--gradient_checkpointing"})  # fmt: skip
    argv = job.argv("new.json", script_overrides(Candidate(1, "none", 2, 4, True), s))
    assert argv[1:] == ["-m", "ds_launcher", "--num_gpus=2", "train.py", "--deepspeed", "new.json",
                        "--per_device_train_batch_size", "2", "--gas", "4", "--gradient_checkpointing"]  # fmt: skip
    with pytest.raises(ValueError, match="--deepspeed_config"):
        Job((), "train.py", ("--lr", "1")).config_path()
    # DeepSpeed's `--deepspeed` switch before `--deepspeed_config FILE`, and the `=` form
    switch = Job((), "t.py", ("--deepspeed", "--deepspeed_config", "a.json", "--x"))
    assert switch.config_path() == "a.json"
    assert switch.argv("b.json", {})[-4:] == ["--deepspeed", "--deepspeed_config", "b.json", "--x"]
    glued = Job((), "t.py", ("--deepspeed_config=a.json",))
    assert (
        glued.config_path() == "a.json"
        and glued.argv("b.json", {})[-1] == "--deepspeed_config=b.json"
    )


def test_png_is_valid():
    data = bar_chart_png([("best", 1.0), ("ok", 0.5), ("failed", 0.0), ("rejected", 0.0)])
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    idat_len = struct.unpack(">I", data[33:37])[0]
    raw = zlib.decompress(data[41 : 41 + idat_len])
    assert len(raw) == height * (1 + 3 * width)
    # bottom row: the best bar is green where it stands
    bottom = raw[(height - 1) * (1 + 3 * width) + 1 :]
    assert bottom[3 * 4 : 3 * 4 + 3] == bytes((46, 160, 67))


def _gib(table):
    return lambda c: int(table[c] * 2**30)


def test_prune_keeps_a_lighter_memory_fallback_for_what_a_faster_candidate_beats():
    # the 6B GPT on one 80 GB device: only offloaded candidates fit at micro-batch 2
    z2_opt, z3_opt = Candidate(2, "optimizer", 2, 8, False), Candidate(3, "optimizer", 2, 8, False)
    z3_all = Candidate(3, "optimizer+param", 2, 8, False)
    gib = _gib({z2_opt: 63.1, z3_opt: 63.1, z3_all: 49.6})
    feasible = [z2_opt, z3_opt, z3_all]
    kept = prune(feasible, 1, gib)
    assert kept == [z2_opt]
    # z3 with the optimizer offloaded needs no less memory than z2: never run; z3 offloading
    # the parameters too needs less: run only if z2 fails
    assert fallbacks(feasible, kept, 1, gib) == {z3_all: (z2_opt,)}
    # a larger micro-batch of z2 fits too: it beats z2 at micro-batch 2, which becomes its
    # fallback (less memory), and z3_all stays the fallback of that fallback
    z2_opt4 = Candidate(2, "optimizer", 4, 4, False)
    feasible.append(z2_opt4)
    gib = _gib({z2_opt: 63.1, z3_opt: 63.1, z3_all: 49.6, z2_opt4: 75.0})
    assert prune(feasible, 1, gib) == [z2_opt4]
    assert fallbacks(feasible, [z2_opt4], 1, gib) == {z2_opt: (z2_opt4,), z3_all: (z2_opt,)}


def test_prune_across_stages_only_on_one_device():
    z2_opt, z3_opt = Candidate(2, "optimizer", 2, 4, False), Candidate(3, "optimizer", 2, 4, False)
    z3_all = Candidate(3, "optimizer+param", 2, 4, False)
    gib = _gib({z2_opt: 30.0, z3_opt: 20.0, z3_all: 10.0})
    feasible = [z2_opt, z3_opt, z3_all]
    # two ranks: ZeRO-3 partitions what ZeRO-2 keeps whole, so neither stage is pruned for the
    # other; parameter offload at the same stage still only buys memory
    assert prune(feasible, 2, gib) == [z2_opt, z3_opt]
    assert fallbacks(feasible, [z2_opt, z3_opt], 2, gib) == {z3_all: (z3_opt,)}
    # one rank: z2 beats both; each needs less memory, z3_all less than z3_opt as well
    assert prune(feasible, 1, gib) == [z2_opt]
    assert fallbacks(feasible, [z2_opt], 1, gib) == {z3_opt: (z2_opt,), z3_all: (z2_opt, z3_opt)}


def test_search_runs_a_fallback_only_after_all_that_beat_it_failed():
    z2_opt, z3_opt = Candidate(2, "optimizer", 2, 8, False), Candidate(3, "optimizer", 2, 8, False)
    z3_all = Candidate(3, "optimizer+param", 2, 8, False)
    backup = {z3_opt: (z2_opt,), z3_all: (z2_opt, z3_opt)}
    s = AutotuneSettings.from_config({"tuner_early_stopping": 1})

    def ran(values):
        return [(o.candidate, o.value) for o in search([z2_opt], s, values.get, fallback_of=backup)]

    assert ran({z2_opt: 4.7, z3_opt: 4.6, z3_all: 2.5}) == [(z2_opt, 4.7)]
    # z2 out of memory: z3 runs next although one failure already meets early stopping
    assert ran({z3_opt: 4.6, z3_all: 2.5}) == [(z2_opt, None), (z3_opt, 4.6)]
    # both fail: the parameters are offloaded too
    assert ran({z3_all: 2.5}) == [(z2_opt, None), (z3_opt, None), (z3_all, 2.5)]
    # the trial cap still holds
    capped = AutotuneSettings.from_config({"tuner_num_trials": 2})
    out = search([z2_opt], capped, {}.get, fallback_of=backup)
    assert [o.candidate for o in out] == [z2_opt, z3_opt]


def test_a_candidate_is_pruned_only_by_one_that_survives_pruning():
    # z1 (mbs 2) is dropped for z2 at mbs 4 (no more memory, higher prior); z3 offloading the
    # parameters is beaten only by that z1, so it must stay in the search
    z1 = Candidate(1, "optimizer", 2, 8, False)
    z2_big = Candidate(2, "optimizer", 4, 4, False)
    z3_all = Candidate(3, "optimizer+param", 2, 8, False)
    gib = _gib({z1: 50.0, z2_big: 40.0, z3_all: 30.0})
    kept = prune([z1, z2_big, z3_all], 1, gib)
    assert kept == [z2_big, z3_all]
    assert fallbacks([z1, z2_big, z3_all], kept, 1, gib) == {}
