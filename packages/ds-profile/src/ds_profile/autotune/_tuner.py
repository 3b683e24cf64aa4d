"""Which candidates to run, in which order, and when to stop: pure functions over a trial
callback, so the search logic is tested without launching anything.

* ``model_based`` (and any tuner with ``fast``): candidates ordered by a prior of relative
  throughput (bigger micro-batches amortize better; each ZeRO stage, offload and activation
  checkpointing costs a known share), with variants pruned that only trade speed for memory
  when a faster feasible variant exists (see ``prune``).
* ``gridsearch``: the grid in order (stage, offload, checkpointing, micro-batch).
* ``random``: the grid shuffled (``seed``).

Every tuner stops after ``tuner_early_stopping`` consecutive trials that do not improve the
best metric, or after ``tuner_num_trials`` trials.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ds_profile.autotune._settings import AutotuneSettings
from ds_profile.autotune._space import Candidate

_OFFLOAD_COST = {"none": 1.0, "optimizer": 0.55, "optimizer+param": 0.35}


def prior(c: Candidate, world: int) -> float:
    """Relative throughput expected before measuring (only the order matters)."""
    stage = (1.0, 0.97, 0.94, 0.85) if world == 1 else (1.0, 1.0, 0.97, 0.85)
    saturation = c.micro_batch / (c.micro_batch + 1.0)
    return (
        saturation * stage[c.stage] * _OFFLOAD_COST[c.offload] * (0.75 if c.checkpointing else 1.0)
    )


def prune(
    feasible: list[Candidate], world: int, bytes_of: Callable[[Candidate], int]
) -> list[Candidate]:
    """Drop candidates another feasible one beats on every axis that matters.

    * an offloaded or checkpointed candidate when a plain one (no offload, no checkpointing)
      fits at a micro-batch at least as large: offload and checkpointing only buy memory;
    * a candidate when another with at least its micro-batch, no more memory and a higher
      prior exists (one device: ZeRO 1-3 save nothing over stage 0 and add work).
    """
    plain_max = max(
        (c.micro_batch for c in feasible if c.offload == "none" and not c.checkpointing), default=0
    )
    kept = []
    for c in feasible:
        if (c.offload != "none" or c.checkpointing) and plain_max >= c.micro_batch:
            continue
        dominated = any(
            d is not c and d.micro_batch >= c.micro_batch and bytes_of(d) <= bytes_of(c)
            and prior(d, world) > prior(c, world) and d.checkpointing == c.checkpointing
            and d.offload == c.offload
            for d in feasible
        )  # fmt: skip
        if not dominated:
            kept.append(c)
    return kept


def order(candidates: list[Candidate], settings: AutotuneSettings, world: int) -> list[Candidate]:
    if settings.tuner_type == "random":
        shuffled = sorted(candidates)
        random.Random(settings.seed).shuffle(shuffled)
        return shuffled
    if settings.tuner_type == "gridsearch":
        rank = {"none": 0, "optimizer": 1, "optimizer+param": 2}
        return sorted(
            candidates, key=lambda c: (c.stage, rank[c.offload], c.checkpointing, c.micro_batch)
        )
    return sorted(candidates, key=lambda c: (-prior(c, world), c))


@dataclass(frozen=True)
class Outcome:
    candidate: Candidate
    value: float | None  # the metric, None when the trial failed


def better(a: float, b: float, metric: str) -> bool:
    return a < b if metric == "latency" else a > b


def search(candidates: Iterable[Candidate], settings: AutotuneSettings,
           run: Callable[[Candidate], float | None],
           stop: Callable[[], bool] | None = None) -> list[Outcome]:  # fmt: skip
    """Run candidates in the given order until early stopping, the trial cap, or ``stop()``
    (asked before each candidate: the session's time limit)."""
    outcomes: list[Outcome] = []
    best: float | None = None
    stale = 0
    for cand in candidates:
        if len(outcomes) >= settings.tuner_num_trials or stale >= settings.tuner_early_stopping:
            break
        if stop is not None and stop():
            break
        value = run(cand)
        outcomes.append(Outcome(cand, value))
        if value is not None and (best is None or better(value, best, settings.metric)):
            best, stale = value, 0
        else:
            stale += 1
    return outcomes
