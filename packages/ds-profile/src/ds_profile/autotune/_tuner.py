"""Which candidates to run, in which order, and when to stop: pure functions over a trial
callback, so the search logic is tested without launching anything.

* ``model_based`` (and any tuner with ``fast``): candidates ordered by a prior of relative
  throughput (bigger micro-batches amortize better; each ZeRO stage, offload and activation
  checkpointing costs a known share), with variants pruned that only trade speed for memory
  when a faster feasible variant exists (see ``prune``): more offload, checkpointing, a
  higher stage on one device, a smaller micro-batch of the same configuration. A pruned variant that needs less
  memory than every candidate beating it is kept as a fallback (``fallbacks``): it runs only
  if all of those fail (say, out of memory despite the estimate).
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


def _stage_cost(stage: int, world: int) -> float:
    return ((1.0, 0.97, 0.94, 0.85) if world == 1 else (1.0, 1.0, 0.97, 0.85))[stage]


def prior(c: Candidate, world: int) -> float:
    """Relative throughput expected before measuring (only the order matters)."""
    saturation = c.micro_batch / (c.micro_batch + 1.0)
    return (
        saturation
        * _stage_cost(c.stage, world)
        * _OFFLOAD_COST[c.offload]
        * (0.75 if c.checkpointing else 1.0)
    )


def beats(d: Candidate, c: Candidate, world: int) -> bool:
    """``d`` is expected faster than ``c``, whatever the memory (offload, checkpointing, a
    single device's higher stages and smaller micro-batches only buy memory):

    * at the same micro-batch: no more offload, no checkpointing where ``c`` has none, the same
      ZeRO stage (on one device: a stage no higher, as partitioning there saves nothing and
      adds work), and a higher prior (so one of those strictly);
    * the same configuration (stage, offload, checkpointing) at a larger micro-batch: the
      global batch is kept, so ``d`` runs the same samples in fewer, larger steps (larger
      GEMMs, fewer launches, fewer gradient reductions and parameter fetches, the same
      optimizer step). Every exhaustive grid measured so far agrees (a larger micro-batch of
      the same configuration was never slower); ``fallbacks`` still runs ``c`` if ``d`` fails.
    """
    if (d.stage, d.offload, d.checkpointing) == (c.stage, c.offload, c.checkpointing):
        return d.micro_batch > c.micro_batch
    return (
        d.micro_batch == c.micro_batch
        and _OFFLOAD_COST[d.offload] >= _OFFLOAD_COST[c.offload]
        and d.checkpointing <= c.checkpointing
        and (d.stage == c.stage or (world == 1 and d.stage <= c.stage))
        and prior(d, world) > prior(c, world)
    )


def _plain_max(feasible: list[Candidate]) -> int:
    return max(
        (c.micro_batch for c in feasible if c.offload == "none" and not c.checkpointing), default=0
    )


def _dominated_at_no_more_memory(
    c: Candidate, feasible: list[Candidate], world: int, bytes_of: Callable[[Candidate], int]
) -> bool:
    if (c.offload != "none" or c.checkpointing) and _plain_max(feasible) >= c.micro_batch:
        return True  # a plain candidate fits at a micro-batch at least as large
    return any(
        d is not c and d.micro_batch >= c.micro_batch and bytes_of(d) <= bytes_of(c)
        and prior(d, world) > prior(c, world) and d.checkpointing == c.checkpointing
        and d.offload == c.offload
        for d in feasible
    )  # fmt: skip


def prune(
    feasible: list[Candidate], world: int, bytes_of: Callable[[Candidate], int]
) -> list[Candidate]:
    """Drop candidates another feasible one beats on every axis that matters.

    * an offloaded or checkpointed candidate when a plain one (no offload, no checkpointing)
      fits at a micro-batch at least as large: offload and checkpointing only buy memory;
    * a candidate when another with at least its micro-batch, no more memory and a higher
      prior exists (one device: ZeRO 1-3 save nothing over stage 0 and add work);
    * a candidate that another feasible one ``beats`` (``fallbacks`` keeps those that need
      less memory than all that beat them, to run if those fail).
    """
    first = [c for c in feasible if not _dominated_at_no_more_memory(c, feasible, world, bytes_of)]
    # only candidates that survive the memory rules may beat others away: one dropped there
    # would leave what it beats neither run nor a fallback of anything run
    return [c for c in first if not any(beats(d, c, world) for d in first)]


def fallbacks(
    feasible: list[Candidate],
    kept: list[Candidate],
    world: int,
    bytes_of: Callable[[Candidate], int],
) -> dict[Candidate, tuple[Candidate, ...]]:
    """Candidates pruned only because a faster one ``beats`` them, that need less memory than
    every kept candidate or fallback doing so: each mapped to those candidates (its
    dominators), to run if they all fail (an estimate too low: out of memory). Highest prior
    first."""
    out: dict[Candidate, tuple[Candidate, ...]] = {}
    for c in sorted(feasible, key=lambda c: (-prior(c, world), c)):
        if c in kept or _dominated_at_no_more_memory(c, feasible, world, bytes_of):
            continue
        # kept candidates and earlier fallbacks (higher priors): c runs only if all fail
        doms = tuple(d for d in [*kept, *out] if beats(d, c, world))
        if doms and all(bytes_of(d) > bytes_of(c) for d in doms):
            out[c] = doms
    return out


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
           stop: Callable[[], bool] | None = None,
           fallback_of: dict[Candidate, tuple[Candidate, ...]] | None = None,
           ) -> list[Outcome]:  # fmt: skip
    """Run candidates in the given order until early stopping, the trial cap, or ``stop()``
    (asked before each candidate: the session's time limit).

    ``fallback_of`` (see ``fallbacks``): a fallback runs right after the last of its
    dominators fails, early stopping notwithstanding (the failures it answers are what
    counted towards it); it never runs while one of them has not failed."""
    queue = [(c, False) for c in candidates]
    waiting = dict(fallback_of or {})
    failed: set[Candidate] = set()
    outcomes: list[Outcome] = []
    best: float | None = None
    stale = 0
    while queue:
        cand, is_fallback = queue.pop(0)
        if len(outcomes) >= settings.tuner_num_trials:
            break
        if stale >= settings.tuner_early_stopping and not is_fallback:
            continue  # stopped early; a fallback queued ahead of these still runs
        if stop is not None and stop():
            break
        value = run(cand)
        outcomes.append(Outcome(cand, value))
        if value is not None and (best is None or better(value, best, settings.metric)):
            best, stale = value, 0
        else:
            stale += 1
        if value is None:
            failed.add(cand)
            ready = [c for c, doms in waiting.items() if all(d in failed for d in doms)]
            for c in ready:
                del waiting[c]
            queue[:0] = [(c, True) for c in ready]  # in ``fallbacks``' order
    return outcomes
