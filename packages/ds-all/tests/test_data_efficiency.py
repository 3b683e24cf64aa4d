"""The data-efficiency sections drive the engine as in DeepSpeed: legacy curriculum learning
(curriculum_seqlen), progressive layer drop (progressive_layer_drop/pld_theta), random-LTD and the
curriculum data sampler; bad sections are ConfigErrors; the state resumes from a checkpoint."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ds_all
import ds_data
from ds_all import ConfigError
from ds_all._config import DeepSpeedConfig
from ds_comm.testing import distributed_test

CURRICULUM = {"enabled": True, "curriculum_type": "seqlen", "min_difficulty": 2, "max_difficulty": 8,
              "schedule_type": "fixed_linear",
              "schedule_config": {"total_curriculum_step": 6, "difficulty_step": 2}}  # fmt: skip
PLD = {"enabled": True, "theta": 0.5, "gamma": 0.1}


class Recorder(nn.Module):
    """A tiny LM that records the keywords the engine passes and truncates to curriculum_seqlen
    as Megatron's GPT does."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 16)
        self.seen: list[dict] = []

    def forward(self, x, y, curriculum_seqlen=None, progressive_layer_drop=False, pld_theta=None):
        self.seen.append({"curriculum_seqlen": curriculum_seqlen, "pld": progressive_layer_drop,
                          "pld_theta": pld_theta})  # fmt: skip
        if curriculum_seqlen is not None:
            x, y = x[:, :curriculum_seqlen], y[:, :curriculum_seqlen]
        logits = self.head(self.emb(x))
        return F.cross_entropy(logits.reshape(-1, 16), y.reshape(-1))


def _config(**sections):
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
            "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, **sections}  # fmt: skip


def _engine(cfg, model=None):
    torch.manual_seed(0)
    engine, _, _, _ = ds_all.initialize(model=model or Recorder(), config=cfg)
    return engine


def _train(engine, micro_steps, start=0):
    for i in range(start, start + micro_steps):
        g = torch.Generator().manual_seed(i)
        x = torch.randint(0, 16, (2, 8), generator=g)
        loss = engine(x, (x + 1) % 16)
        engine.backward(loss)
        engine.step()


def test_curriculum_seqlen_and_pld_keywords_follow_deepspeeds_engine():
    engine = _engine(_config(curriculum_learning=CURRICULUM, progressive_layer_drop=PLD))
    _train(engine, 10)
    seen = engine.module.seen
    # DeepSpeed's engine: each training forward updates the curriculum to global_steps + 1; the
    # PLD theta is updated at each boundary from global_steps before it is incremented.
    sched = ds_data.CurriculumScheduler({k: v for k, v in CURRICULUM.items() if k != "enabled"})
    pld = ds_data.ProgressiveLayerDrop(theta=0.5, gamma=0.1)
    expected, steps = [], 0
    for micro in range(10):
        expected.append({"curriculum_seqlen": sched.update_difficulty(steps + 1), "pld": True,
                         "pld_theta": pld.get_theta()})  # fmt: skip
        if micro % 2 == 1:
            pld.update_state(steps)
            steps += 1
    assert seen == expected
    assert [s["curriculum_seqlen"] for s in seen] == [2, 2, 4, 4, 4, 4, 6, 6, 6, 6]
    assert engine.get_pld_theta() == pld.get_theta() and engine.pld_enabled()
    engine.eval()
    engine(torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long))
    assert engine.module.seen[-1] == {"curriculum_seqlen": None, "pld": False, "pld_theta": None}


def test_schedule_state_resumes_from_checkpoint(tmp_path):
    cfg = _config(curriculum_learning=CURRICULUM, progressive_layer_drop=PLD)
    full = _engine(cfg)
    _train(full, 12)
    half = _engine(cfg)
    _train(half, 6)
    half.save_checkpoint(str(tmp_path))
    resumed = _engine(cfg)
    resumed.load_checkpoint(str(tmp_path))
    _train(resumed, 6, start=6)
    assert resumed.module.seen == full.module.seen[6:]
    assert resumed.get_pld_theta() == full.get_pld_theta()


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.calls: list[int] = []

    def forward(self, h, attention_mask=None):
        self.calls.append(h.shape[1])
        return torch.tanh(self.lin(h)) + h


class LTDNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.layers = nn.ModuleList(Block() for _ in range(3))
        self.head = nn.Linear(8, 16)

    def forward(self, x, y):
        h = self.emb(x)
        for layer in self.layers:
            h = layer(h)
        return F.cross_entropy(self.head(h).reshape(-1, 16), y.reshape(-1))


def test_random_ltd_drops_tokens_in_the_configured_layers():
    ltd = {"enabled": True, "total_layer_num": 3, "random_ltd_layer_num": 2,
           "random_ltd_layer_id": [0, 2], "model_mask_name": None, "model_type": "decoder",
           "hidden_state_order": "batch_seq_dim",
           "random_ltd_schedule": {"min_value": 2, "max_value": 8, "schedule_type": "fixed_linear",
                                   "schedule_config": {"require_steps": 3, "seq_per_step": 2}}}  # fmt: skip
    engine = _engine(_config(data_efficiency={"data_routing": {"random_ltd": ltd}}), LTDNet())
    ds_data.convert_to_random_ltd(engine, Block)  # DeepSpeed's helper calls random_ltd_initialize
    assert engine.random_ltd_enabled()
    _train(engine, 8)
    layers = [m.random_ltd_layer for m in engine.module.layers]
    # kept length floor(step / 3 * 6 + 2) rounded to 2: steps 0,0,1,1,2,2,3,3 -> 2,2,4,4,6,6,8,8
    assert layers[0].calls == layers[2].calls == [2, 2, 4, 4, 6, 6, 8, 8]
    assert layers[1].calls == [8] * 8
    assert engine.random_ltd_scheduler.state["consumed_layer_tokens"] > 0
    bad = copy.deepcopy(ltd)
    bad["random_ltd_layer_id"] = [0, 5]
    engine = _engine(_config(data_efficiency={"data_routing": {"random_ltd": bad}}), LTDNet())
    with pytest.raises(ConfigError, match="random_ltd_layer_num"):
        ds_data.convert_to_random_ltd(engine, Block)


def test_curriculum_sampler_is_the_training_loader(tmp_path):
    n = 60
    difficulty = [(i * 7) % 10 + 1 for i in range(n)]
    ds_data.DataAnalyzer(list(range(n)), batch_size=5, metric_names=["d"],
                         metric_functions=[lambda b: torch.tensor([difficulty[i] for i in b])],
                         metric_types=["single_value_per_sample"], save_path=tmp_path / "a",
                         num_threads=2).run_map()  # fmt: skip
    ds_data.DataAnalyzer(list(range(n)), metric_names=["d"], metric_functions=[None],
                         metric_types=["single_value_per_sample"], save_path=tmp_path / "a",
                         num_threads=2).run_reduce()  # fmt: skip
    prefix = tmp_path / "a" / "d" / "d"
    metric = {"difficulty_type": "value", "clustering_type": "schedule_based",
              "min_difficulty": 3, "max_difficulty": 10, "schedule_type": "fixed_linear",
              "schedule_config": {"total_curriculum_step": 5, "difficulty_step": 1},
              "index_to_sample_path": f"{prefix}_index_to_sample",
              "index_to_metric_path": f"{prefix}_index_to_metric"}  # fmt: skip
    de = {"data_sampling": {"num_epochs": 1, "curriculum_learning": {
        "enabled": True, "data_cluster_path": str(tmp_path / "c"),
        "curriculum_metrics": {"d": metric}}}}  # fmt: skip
    torch.manual_seed(0)
    engine, _, loader, _ = ds_all.initialize(model=Recorder(), config=_config(data_efficiency=de),
                                             training_data=torch.arange(n))  # fmt: skip
    assert engine.curriculum_learning_enabled()
    got = [b.tolist() for _, b in zip(range(6), loader)]
    sampler = ds_data.DeepSpeedDataSampler(ds_data.data_efficiency_config(
        {**de, "data_sampling": {**de["data_sampling"], "curriculum_learning": {
            **de["data_sampling"]["curriculum_learning"], "data_cluster_path": str(tmp_path / "d")}}}),
        n, 2, 0, 1, None, 2)  # fmt: skip
    assert got == [b for _, b in zip(range(6), sampler)]
    assert max(difficulty[i] for i in got[0] + got[1]) <= 4  # step 1's difficulty: 3 + 7/5 -> 4


@pytest.mark.parametrize(
    ("sections", "match"),
    [
        ({"curriculum_learning": {"enabled": True, "min_difficulty": 1}}, "curriculum_type"),
        ({"curriculum_learning": {**CURRICULUM, "schedule_type": "cosine"}}, "cosine"),
        ({"progressive_layer_drop": {"enabled": True, "theta": 2}}, "theta"),
        ({"progressive_layer_drop": {"enabled": True, "thetta": 0.5}}, "thetta"),
        (
            {"data_efficiency": {"data_sampling": {"dynamic_batching": {"enabled": True}}}},
            "dynamic_batching",
        ),  # fmt: skip
        (
            {"data_efficiency": {"data_sampling": {"curriculum_learning": {"enabled": True}}}},
            "curriculum_metrics",
        ),  # fmt: skip
        ({"data_efficiency": {"data_routing": {"random_ltd": {"enabled": True}}}}, "needs"),
        ({"sparse_attention": {"mode": "sparse"}}, "mode"),
        (
            {"sparse_attention": {"mode": "fixed", "num_local_blocks": 3, "num_global_blocks": 2}},
            "num_local_blocks",
        ),  # fmt: skip
    ],
)
def test_bad_sections_are_config_errors(sections, match):
    with pytest.raises(ConfigError, match=match):
        DeepSpeedConfig.load(_config(**sections))


def test_sections_load_without_the_ignored_warning_and_sparse_attention_is_usable():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = DeepSpeedConfig.load(_config(sparse_attention={"mode": "bigbird", "block": 16},
                                           data_efficiency={"enabled": True, "seed": 3}))  # fmt: skip
    assert cfg.sparse_attention == {"mode": "bigbird", "block": 16}
    engine = _engine(cfg)
    assert engine.sparse_attention_config()["num_sliding_window_blocks"] == 3  # DeepSpeed's default
    sparsity = engine.sparsity_config(num_heads=4)
    assert isinstance(sparsity, ds_data.sparse_attention.BigBirdSparsityConfig)
    assert engine.data_efficiency_config()["seed"] == 3 and not engine.random_ltd_enabled()


def test_deepspeed_module_paths_are_ds_data():
    from ds_all.ops.sparse_attention import BigBirdSparsityConfig, SparseSelfAttention
    from ds_all.runtime.data_pipeline.curriculum_scheduler import CurriculumScheduler
    from ds_all.runtime.data_pipeline.data_routing.basic_layer import RandomLayerTokenDrop
    from ds_all.runtime.data_pipeline.data_sampling.data_analyzer import DataAnalyzer
    from ds_all.runtime.data_pipeline.data_sampling.data_sampler import DeepSpeedDataSampler
    from ds_all.runtime.progressive_layer_drop import ProgressiveLayerDrop

    assert CurriculumScheduler is ds_data.CurriculumScheduler
    assert (
        DataAnalyzer is ds_data.DataAnalyzer
        and DeepSpeedDataSampler is ds_data.DeepSpeedDataSampler
    )
    assert RandomLayerTokenDrop is ds_data.RandomLayerTokenDrop
    assert ProgressiveLayerDrop is ds_data.ProgressiveLayerDrop
    assert SparseSelfAttention is ds_data.sparse_attention.SparseSelfAttention
    assert BigBirdSparsityConfig is ds_data.sparse_attention.BigBirdSparsityConfig


@distributed_test(world_size=[2])
def test_two_ranks_analyze_together_and_draw_their_shares(tmp_path):
    """2 gloo ranks: each maps half of the dataset, rank 0 reduces; each rank's loader yields its
    half of every micro-batch of the single-process sampler's stream; the sparse-attention layout
    is rank 0's on both ranks whatever their random state."""
    import random

    import torch.distributed as dist

    rank = dist.get_rank()
    n = 48
    difficulty = [(i * 5) % 12 + 1 for i in range(n)]
    ds_data.DataAnalyzer(list(range(n)), num_workers=2, worker_id=rank, batch_size=5,
                         metric_names=["d"],
                         metric_functions=[lambda b: torch.tensor([difficulty[i] for i in b])],
                         metric_types=["single_value_per_sample"],
                         save_path=tmp_path / "a").run_map_reduce()  # fmt: skip
    prefix = tmp_path / "a" / "d" / "d"
    metric = {"difficulty_type": "value", "clustering_type": "schedule_based",
              "min_difficulty": 4, "max_difficulty": 12, "schedule_type": "fixed_linear",
              "schedule_config": {"total_curriculum_step": 4, "difficulty_step": 1},
              "index_to_sample_path": f"{prefix}_index_to_sample",
              "index_to_metric_path": f"{prefix}_index_to_metric"}  # fmt: skip
    de = {"data_sampling": {"num_epochs": 1, "curriculum_learning": {
        "enabled": True, "data_cluster_path": str(tmp_path / "c"),
        "curriculum_metrics": {"d": metric}}}}  # fmt: skip
    cfg = {**_config(data_efficiency=de), "gradient_accumulation_steps": 1}
    torch.manual_seed(0)
    _, _, loader, _ = ds_all.initialize(model=Recorder(), config=cfg, training_data=torch.arange(n),
                                        dist_init_required=False)  # fmt: skip
    mine = [b.tolist() for _, b in zip(range(6), loader)]
    shares: list = [None, None]
    dist.all_gather_object(shares, mine)
    single_cfg = ds_data.data_efficiency_config(de)
    single_cfg["data_sampling"]["curriculum_learning"]["data_cluster_path"] = str(
        tmp_path / f"s{rank}"
    )
    single = ds_data.DeepSpeedDataSampler(single_cfg, n, micro_batch_size=4, data_parallel_rank=0,
                                          data_parallel_size=1, global_rank=1)  # fmt: skip
    expected = [b for _, b in zip(range(6), single)]
    assert [shares[0][i] + shares[1][i] for i in range(6)] == expected
    random.seed(100 + rank)  # different random blocks per rank until synchronised
    module = ds_data.sparse_attention.SparseSelfAttention(
        ds_data.sparse_attention.BigBirdSparsityConfig(2, 16, different_layout_per_head=True),
        max_seq_length=256,
    )
    layouts: list = [None, None]
    dist.all_gather_object(layouts, module.get_layout(256).tolist())
    assert layouts[0] == layouts[1]
