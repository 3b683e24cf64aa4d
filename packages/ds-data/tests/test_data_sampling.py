"""DataAnalyzer (multi-process) and the curriculum sampler against DeepSpeed's own outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ds_data import DataAnalyzer, DataConfigError, DeepSpeedDataSampler, IndexedRows

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REF = json.loads((FIXTURES / "sampler_reference.json").read_text())
N = REF["num_samples"]
SEQLEN = REF["seqlen"]
FILES = [
    "index_to_sample",
    "index_to_metric",
    "index_to_sample_percentile_merged",
    "sample_to_metric",
]


class Lengths(torch.utils.data.Dataset):
    def __len__(self):
        return N

    def __getitem__(self, i):
        return i


def seqlen_metric(batch):
    return torch.tensor([SEQLEN[int(i)] for i in batch], dtype=torch.int64)


def _analyze(root: Path, num_workers: int, num_threads: int, **kw) -> Path:
    for worker in range(num_workers):
        DataAnalyzer(Lengths(), num_workers=num_workers, worker_id=worker, num_threads=num_threads,
                     batch_size=7, metric_names=["seqlen", "total"],
                     metric_functions=[seqlen_metric, lambda b: torch.ones(3, dtype=torch.int64) * len(b)],
                     metric_types=["single_value_per_sample", "accumulate_value_over_samples"],
                     save_path=root, **kw).run_map()  # fmt: skip
    DataAnalyzer(Lengths(), num_workers=num_workers, num_threads=num_threads,
                 metric_names=["seqlen", "total"], metric_functions=[None, None],
                 metric_types=["single_value_per_sample", "accumulate_value_over_samples"],
                 save_path=root).run_reduce()  # fmt: skip
    return root / "seqlen" / "seqlen"


def test_multiprocess_analyzer_writes_deepspeeds_files_byte_for_byte(tmp_path):
    # 2 workers x 2 processes each against DeepSpeed's single-process output.
    prefix = _analyze(tmp_path, num_workers=2, num_threads=2)
    theirs = FIXTURES / "analyzer" / "seqlen" / "seqlen"
    for name in FILES:
        for ext in (".bin", ".idx"):
            ours_bytes = Path(f"{prefix}_{name}{ext}").read_bytes()
            assert ours_bytes == Path(f"{theirs}_{name}{ext}").read_bytes(), name + ext
    ours_rows = IndexedRows(f"{prefix}_sample_to_metric")
    assert [int(r[0]) for r in ours_rows] == SEQLEN
    total = IndexedRows(tmp_path / "total" / "total_metric_value")[0]
    assert total.tolist() == [N] * 3


def test_multiprocess_analyzer_equals_single_process(tmp_path):
    one = _analyze(tmp_path / "one", num_workers=1, num_threads=1)
    many = _analyze(tmp_path / "many", num_workers=3, num_threads=2)
    for name in FILES:
        a, b = IndexedRows(f"{one}_{name}"), IndexedRows(f"{many}_{name}")
        assert [r.tolist() for r in a] == [r.tolist() for r in b]
    # And both equal the direct computation: each value's samples, ascending by value.
    rows = IndexedRows(f"{one}_index_to_sample")
    values = [int(v[0]) for v in IndexedRows(f"{one}_index_to_metric")]
    assert values == sorted(set(SEQLEN))
    for value, row in zip(values, rows):
        assert row.tolist() == [i for i, s in enumerate(SEQLEN) if s == value]


def test_analyzer_sample_indices_and_bad_hooks(tmp_path):
    perm = list(reversed(range(N)))
    prefix = _analyze(tmp_path, num_workers=1, num_threads=2, sample_indices=perm)
    first = IndexedRows(f"{prefix}_index_to_sample")[0].tolist()
    assert first == sorted(
        (perm[i] for i, s in enumerate(SEQLEN) if s == min(SEQLEN)), reverse=True
    )
    with pytest.raises(DataConfigError, match="custom_reduce"):
        DataAnalyzer(Lengths(), custom_reduce=lambda *a: None)


def _sampler(name: str, clusters: Path, prefix: Path | None = None) -> DeepSpeedDataSampler:
    run = REF["runs"][name]
    prefix = prefix or FIXTURES / "analyzer" / "seqlen" / "seqlen"
    suffix = "_index_to_sample_percentile_merged" if name == "percentile" else "_index_to_sample"
    metric = {**run["config"], "clustering_type": "schedule_based",
              "index_to_sample_path": f"{prefix}{suffix}",
              "index_to_metric_path": f"{prefix}_index_to_metric"}  # fmt: skip
    cfg = {"seed": 1234, "data_sampling": {"num_epochs": 1, "curriculum_learning": {
        "enabled": True, "data_cluster_path": str(clusters),
        "curriculum_metrics": {"seqlen": metric}}}}  # fmt: skip
    return DeepSpeedDataSampler(cfg, N, micro_batch_size=run["micro_batch_size"],
                                data_parallel_rank=0, data_parallel_size=1,
                                gradient_accumulation_steps=run["gradient_accumulation_steps"])  # fmt: skip


@pytest.mark.parametrize("name", ["value", "percentile"])
def test_sampler_draws_deepspeeds_batches(tmp_path, name):
    sampler = _sampler(name, tmp_path)
    got = []
    for _ in REF["runs"][name]["global_batches"]:
        sampler.get_next_global_batch()
        got.append(sampler.batch)
    assert got == REF["runs"][name]["global_batches"]
    # The curriculum holds: every sample drawn at a step is within that step's difficulty.
    if name == "value":
        from ds_data import CurriculumScheduler

        schedule = CurriculumScheduler(REF["runs"][name]["config"])
        for step, batch in enumerate(got, start=1):
            assert max(SEQLEN[i] for i in batch) <= schedule.update_difficulty(step)


def test_sampler_resumes_exactly_from_its_state(tmp_path):
    clusters = tmp_path / "clusters"
    straight = _sampler("value", clusters)
    stream = iter(straight)
    expected = [next(stream) for _ in range(40)]
    shutil.rmtree(clusters)
    first = _sampler("value", clusters)
    it = iter(first)
    head = [next(it) for _ in range(17)]  # mid global batch (2 micro-batches per global batch)
    state = json.loads(json.dumps(first.state_dict()))  # JSON round trip: no pickle needed
    resumed = _sampler("value", clusters)
    resumed.load_state_dict(state)
    it = iter(resumed)
    tail = [next(it) for _ in range(23)]
    assert head + tail == expected


def test_sampler_ranks_take_their_share_of_the_same_batches(tmp_path):
    # Each rank computes the same global batches from the seed (no broadcast) and yields its
    # slice of every micro-batch; together the ranks cover the single-rank stream.
    single = _sampler("value", tmp_path / "single")
    cfg = single.data_efficiency_config
    stream = iter(single)
    whole = [next(stream) for _ in range(8)]  # micro-batches of 3 x gas 2
    shares = []
    for rank in range(3):
        cfg["data_sampling"]["curriculum_learning"]["data_cluster_path"] = str(
            tmp_path / f"r{rank}"
        )
        ranked = DeepSpeedDataSampler(cfg, N, micro_batch_size=1, data_parallel_rank=rank,
                                      data_parallel_size=3, gradient_accumulation_steps=2,
                                      global_rank=rank)  # fmt: skip
        it = iter(ranked)
        shares.append([next(it) for _ in range(8)])
    assert [sum((shares[r][i] for r in range(3)), []) for i in range(8)] == whole


def test_sampler_needs_a_curriculum(tmp_path):
    with pytest.raises(DataConfigError, match="curriculum_learning.enabled"):
        DeepSpeedDataSampler({"data_sampling": {}}, N, 2, 0, 1)
    with pytest.raises(FileNotFoundError, match="index file"):
        _sampler("value", tmp_path, prefix=tmp_path / "missing")


def test_index_rows_roundtrip(tmp_path):
    from ds_data import write_rows

    rows = [np.arange(5), np.array([], dtype=np.int64), np.array([7, 300])]
    write_rows(tmp_path / "x", rows, np.uint16)
    back = IndexedRows(tmp_path / "x")
    assert [r.tolist() for r in back] == [r.tolist() for r in rows] and back.dtype == np.uint16
