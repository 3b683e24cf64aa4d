"""Regenerate tests/fixtures/analyzer/ and tests/fixtures/sampler_reference.json with DeepSpeed.

    /work/dsenv/bin/python tests/make_sampler_reference.py

Runs DeepSpeed 0.19.8's DataAnalyzer over a small synthetic dataset (its index files, in
DeepSpeed's mmap format, are kept as fixtures: ds-data reads them) and its DeepSpeedDataSampler
(one gloo rank) over those files, recording the global batches it draws per step.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent / "fixtures"
N = 240


def seqlen(i: int) -> int:
    return (i * 37) % 61 + 4


class Lengths(torch.utils.data.Dataset):
    def __len__(self):
        return N

    def __getitem__(self, i):
        return i


def metric(batch):
    return np.array([seqlen(int(i)) for i in batch], dtype=np.int64)


CONFIGS = {
    "value": {
        "difficulty_type": "value",
        "min_difficulty": 12,
        "max_difficulty": 64,
        "schedule_type": "fixed_linear",
        "schedule_config": {"total_curriculum_step": 12, "difficulty_step": 8},
    },
    "percentile": {
        "difficulty_type": "percentile",
        "min_difficulty": 10,
        "max_difficulty": 100,
        "schedule_type": "fixed_discrete",
        "schedule_config": {"difficulty": [10, 40, 100], "max_step": [4, 9]},
    },
}
STEPS = 30


def main() -> None:
    import deepspeed
    import deepspeed.comm as dist
    from deepspeed.runtime.data_pipeline.data_sampling.data_analyzer import DataAnalyzer
    from deepspeed.runtime.data_pipeline.data_sampling.data_sampler import DeepSpeedDataSampler

    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29581"
    )
    deepspeed.init_distributed(dist_backend="gloo")
    out_dir = HERE / "analyzer"
    shutil.rmtree(out_dir, ignore_errors=True)
    analyzer = DataAnalyzer(
        Lengths(),
        batch_size=7,
        metric_names=["seqlen"],
        metric_functions=[metric],
        metric_types=["single_value_per_sample"],
        metric_dtypes=[np.int64],
        save_path=str(out_dir),
    )
    analyzer.run_map()
    analyzer.run_reduce()
    for p in (out_dir / "seqlen").iterdir():  # keep only the merged index files
        if p.is_dir() or "thread" in p.name or p.suffix == ".csv":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    record = {
        "deepspeed": deepspeed.__version__,
        "num_samples": N,
        "seqlen": [seqlen(i) for i in range(N)],
        "runs": {},
    }
    prefix = out_dir / "seqlen" / "seqlen"
    for name, metric_cfg in CONFIGS.items():
        with tempfile.TemporaryDirectory() as clusters:
            cfg = {
                "seed": 1234,
                "data_sampling": {
                    "num_epochs": 1,
                    "curriculum_learning": {
                        "enabled": True,
                        "data_cluster_path": clusters,
                        "curriculum_metrics": {
                            "seqlen": {
                                **metric_cfg,
                                "clustering_type": "schedule_based",
                                "index_to_sample_path": f"{prefix}_index_to_sample_percentile_merged"
                                if name == "percentile"
                                else f"{prefix}_index_to_sample",
                                "index_to_metric_path": f"{prefix}_index_to_metric",
                            }
                        },
                    },
                },
            }
            sampler = DeepSpeedDataSampler(
                cfg,
                N,
                micro_batch_size=3,
                data_parallel_rank=0,
                data_parallel_size=1,
                data_parallel_group=dist.get_world_group(),
                gradient_accumulation_steps=2,
                global_rank=0,
            )
            batches = []
            for _ in range(STEPS):
                sampler.get_next_global_batch()
                batches.append(list(sampler.batch))
            record["runs"][name] = {
                "config": metric_cfg,
                "micro_batch_size": 3,
                "gradient_accumulation_steps": 2,
                "global_batches": batches,
            }
    (HERE / "sampler_reference.json").write_text(json.dumps(record) + "\n")
    print("wrote", sorted(p.name for p in (out_dir / "seqlen").iterdir()))


if __name__ == "__main__":
    main()
