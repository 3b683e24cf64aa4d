"""``deepspeed.runtime.lr_schedules``: DeepSpeed's schedule names and classes (ds_all's)."""

from ds_all._schedulers import (
    WARMUP_LINEAR_RATE,
    WARMUP_LOG_RATE,
    LRRangeTest,
    OneCycle,
    WarmupCosineLR,
    WarmupDecayLR,
    WarmupLR,
)

# The config's scheduler "type" strings; clients (Hugging Face Trainer) check names against it.
LR_RANGE_TEST = "LRRangeTest"
ONE_CYCLE = "OneCycle"
WARMUP_LR = "WarmupLR"
WARMUP_DECAY_LR = "WarmupDecayLR"
WARMUP_COSINE_LR = "WarmupCosineLR"
VALID_LR_SCHEDULES = (LR_RANGE_TEST, ONE_CYCLE, WARMUP_LR, WARMUP_DECAY_LR, WARMUP_COSINE_LR)

__all__ = [
    "LRRangeTest",
    "LR_RANGE_TEST",
    "ONE_CYCLE",
    "OneCycle",
    "VALID_LR_SCHEDULES",
    "WARMUP_COSINE_LR",
    "WARMUP_DECAY_LR",
    "WARMUP_LINEAR_RATE",
    "WARMUP_LOG_RATE",
    "WARMUP_LR",
    "WarmupCosineLR",
    "WarmupDecayLR",
    "WarmupLR",
]
