"""A stand-in training job for the session-time-limit test: no model, only the files an engine
writes in an autotuning trial. The profile run writes model_info; a trial writes its metric
(throughput = 10 x micro-batch) at once, except the micro-batch named in TIMED_JOB_SLOW_MBS,
which first sleeps far past the test's session limit."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--deepspeed_config", required=True)
    ap.add_argument("--local_rank", type=int, default=-1)
    cfg = json.loads(Path(ap.parse_args().deepspeed_config).read_text())
    auto = cfg["autotuning"]
    if (auto.get("model_info") or {}).get("profile"):
        info = {"num_params": 1000, "activation_mem_per_gpu": 10, "device_memory_bytes": 2**30}
        Path(auto["model_info_path"]).write_text(json.dumps(info))
        return
    mbs = cfg["train_micro_batch_size_per_gpu"]
    if str(mbs) == os.environ.get("TIMED_JOB_SLOW_MBS"):
        time.sleep(120)
    metric = {"throughput": 10.0 * mbs, "latency": 1.0 / mbs, "FLOPS_per_gpu": 0.0}
    Path(auto["metric_path"]).write_text(json.dumps(metric))


if __name__ == "__main__":
    main()
