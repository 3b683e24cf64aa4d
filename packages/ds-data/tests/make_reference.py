"""Regenerate tests/fixtures/deepspeed_reference.json from DeepSpeed's own classes.

    /work/dsenv/bin/python tests/make_reference.py /path/to/deepspeed-0.17.6/deepspeed

DeepSpeed 0.19.8 (the installed reference) still ships CurriculumScheduler and
RandomLTDScheduler; it removed progressive layer drop and sparse attention, so those two come
from the last release's source tree that has them (0.17.6's sdist, `pip download deepspeed==0.17.6
--no-binary :all: --no-deps`), whose modules are loaded from the given directory. Values are
recorded per step; layouts for a few seeds (DeepSpeed draws random blocks with Python's
`random`, so `random.seed(s)` before make_layout fixes them).
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import deepspeed
from deepspeed.runtime.data_pipeline.curriculum_scheduler import CurriculumScheduler
from deepspeed.runtime.data_pipeline.data_routing.scheduler import RandomLTDScheduler

OUT = Path(__file__).resolve().parent / "fixtures" / "deepspeed_reference.json"

CURRICULA = {
    "linear": {
        "min_difficulty": 8,
        "max_difficulty": 1024,
        "schedule_type": "fixed_linear",
        "schedule_config": {"total_curriculum_step": 300, "difficulty_step": 8},
    },
    "linear_step16_min8": {
        "min_difficulty": 8,
        "max_difficulty": 200,
        "schedule_type": "fixed_linear",
        "schedule_config": {"total_curriculum_step": 50, "difficulty_step": 16},
    },
    "root2": {
        "min_difficulty": 64,
        "max_difficulty": 2048,
        "schedule_type": "fixed_root",
        "schedule_config": {"total_curriculum_step": 500, "difficulty_step": 8, "root_degree": 2},
    },
    "root3": {
        "min_difficulty": 1,
        "max_difficulty": 100,
        "schedule_type": "fixed_root",
        "schedule_config": {"total_curriculum_step": 77, "difficulty_step": 1, "root_degree": 3},
    },
    "discrete": {
        "min_difficulty": 1,
        "max_difficulty": 3,
        "schedule_type": "fixed_discrete",
        "schedule_config": {"difficulty": [1, 2, 3], "max_step": [5, 10]},
    },
}
CURRICULUM_STEPS = 620

LTD = {
    "total_layer_num": 12,
    "random_ltd_layer_num": 10,
    "global_batch_size": 32,
    "layer_token_lr_schedule": {"enabled": False},
    "random_ltd_schedule": {
        "min_value": 128,
        "max_value": 2048,
        "schedule_type": "fixed_linear",
        "schedule_config": {"require_steps": 200, "seq_per_step": 16},
    },
}
LTD_STEPS = 260

PLD = [{"theta": 0.5, "gamma": 0.001}, {"theta": 0.2, "gamma": 0.01}]
PLD_STEPS = [0, 1, 2, 10, 100, 999, 5000]

SPARSITY = [
    ("DenseSparsityConfig", {"num_heads": 2, "block": 16}, 128, [0]),
    ("FixedSparsityConfig", {"num_heads": 4, "block": 16}, 256, [0]),
    (
        "FixedSparsityConfig",
        {
            "num_heads": 4,
            "block": 16,
            "different_layout_per_head": True,
            "num_local_blocks": 4,
            "num_global_blocks": 2,
            "horizontal_global_attention": True,
            "num_different_global_patterns": 2,
        },
        224,
        [0],
    ),
    (
        "FixedSparsityConfig",
        {"num_heads": 2, "block": 8, "attention": "unidirectional", "num_local_blocks": 3},
        176,
        [0],
    ),
    (
        "VariableSparsityConfig",
        {
            "num_heads": 3,
            "block": 16,
            "different_layout_per_head": True,
            "num_random_blocks": 2,
            "local_window_blocks": [1, 2, 4],
            "global_block_indices": [0, 7],
            "global_block_end_indices": [2, 9],
            "horizontal_global_attention": True,
        },
        320,
        [0, 1, 7],
    ),
    (
        "VariableSparsityConfig",
        {"num_heads": 2, "block": 16, "num_random_blocks": 1, "attention": "unidirectional"},
        256,
        [3],
    ),
    (
        "BigBirdSparsityConfig",
        {"num_heads": 4, "block": 16, "different_layout_per_head": True, "num_random_blocks": 2},
        256,
        [0, 1, 42],
    ),
    (
        "BigBirdSparsityConfig",
        {
            "num_heads": 2,
            "block": 16,
            "attention": "unidirectional",
            "num_sliding_window_blocks": 5,
            "num_global_blocks": 2,
        },
        256,
        [5],
    ),
    (
        "BSLongformerSparsityConfig",
        {
            "num_heads": 2,
            "block": 16,
            "num_sliding_window_blocks": 5,
            "global_block_indices": [0, 10],
        },
        256,
        [0],
    ),
    (
        "BSLongformerSparsityConfig",
        {
            "num_heads": 2,
            "block": 16,
            "global_block_indices": [1],
            "global_block_end_indices": [3],
            "attention": "unidirectional",
        },
        192,
        [0],
    ),
    (
        "LocalSlidingWindowSparsityConfig",
        {"num_heads": 2, "block": 16, "num_sliding_window_blocks": 4},
        192,
        [0],
    ),
    (
        "LocalSlidingWindowSparsityConfig",
        {"num_heads": 2, "block": 16, "num_sliding_window_blocks": 3, "attention": "bidirectional"},
        192,
        [0],
    ),
]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    old = Path(sys.argv[1])
    out: dict = {"deepspeed": deepspeed.__version__, "old_source": old.parent.name}
    curricula = {}
    for name, cfg in CURRICULA.items():
        sched = CurriculumScheduler(json.loads(json.dumps(cfg)))
        curricula[name] = {
            "config": cfg,
            "update": [sched.update_difficulty(s) for s in range(CURRICULUM_STEPS)],
            "get": [
                CurriculumScheduler(json.loads(json.dumps(cfg))).get_difficulty(s)
                for s in range(CURRICULUM_STEPS)
            ],
        }
    out["curriculum"] = curricula

    sched = RandomLTDScheduler(json.loads(json.dumps(LTD)))
    seqs, consumed = [], []
    for step in range(LTD_STEPS):
        sched.update_seq(step)
        sched.update_seq(step)  # a second micro-batch of the same step
        seqs.append(sched.get_current_seq())
        consumed.append(sched.state["consumed_layer_tokens"])
    out["random_ltd"] = {
        "config": LTD,
        "seq": seqs,
        "consumed": consumed,
        "state_dict": sched.state_dict(),
    }

    pld_mod = _load(old / "runtime" / "progressive_layer_drop.py", "ds_pld")
    plds = []
    for cfg in PLD:
        pld = pld_mod.ProgressiveLayerDrop(**cfg)
        thetas = []
        for step in PLD_STEPS:
            pld.update_state(step)
            thetas.append(float(pld.get_theta()))
        plds.append({"config": cfg, "steps": PLD_STEPS, "theta": thetas})
    out["pld"] = plds

    sc = _load(old / "ops" / "sparse_attention" / "sparsity_config.py", "ds_sparsity")
    layouts = []
    for cls, kwargs, seq_len, seeds in SPARSITY:
        for seed in seeds:
            random.seed(seed)
            layout = getattr(sc, cls)(**kwargs).make_layout(seq_len)
            layouts.append(
                {
                    "class": cls,
                    "kwargs": kwargs,
                    "seq_len": seq_len,
                    "seed": seed,
                    "layout": layout.tolist(),
                }
            )
    out["sparsity"] = layouts
    OUT.write_text(json.dumps(out, separators=(",", ":")) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
