"""DeepSpeedDataSampler: curriculum data sampling over difficulty-bucketed samples.

Each global batch: every metric's scheduler gives the step's difficulty; when one changes, the
samples newly admitted (difficulty in (previous, current], by value or by percentile) form a new
cluster, shuffled; the batch draws a count per cluster in proportion to cluster sizes and takes
the next samples of each cluster (a cluster used up is reshuffled and restarts), then shuffles
the batch. Every random choice comes from one ``numpy.random.default_rng(seed)`` in DeepSpeed's
order, so the batches are DeepSpeed 0.19.8's, sample for sample.

Differences from DeepSpeed: every rank computes the same global batches from the same seed and
index files (no broadcast from rank 0, so no process group is needed), and ``state_dict()``
saves this generator's state (DeepSpeed saves numpy's global generator, which the sampler does
not use, so its resumed runs draw differently); clusters are index files under
``data_cluster_path``, written by global rank 0, and a resumed run reads them back.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ._curriculum import CurriculumScheduler
from ._errors import DataConfigError
from ._index_file import IndexedRows, find_fit_int_dtype, write_rows

__all__ = ["DeepSpeedDataSampler"]

_log = logging.getLogger(__name__)
_VALUE, _PERCENTILE = "value", "percentile"
_SINGLE = "single_cluster"


class DeepSpeedDataSampler:
    """DeepSpeed's curriculum data sampler (same constructor and methods); yields this rank's
    share of each micro-batch as a list of sample indices.

    ``data_efficiency_config`` is the ``data_efficiency`` section with defaults filled
    (``seed``, ``data_sampling.num_epochs``, ``data_sampling.curriculum_learning`` with
    ``data_cluster_path`` and ``curriculum_metrics``); each metric holds a curriculum schedule
    plus ``difficulty_type`` (``value`` or ``percentile``), ``clustering_type``
    (``schedule_based`` or ``single_cluster``) and, unless single-cluster,
    ``index_to_sample_path`` / ``index_to_metric_path`` (DataAnalyzer outputs).
    """

    def __init__(self, data_efficiency_config: Mapping[str, Any], one_epoch_total_samples: int,
                 micro_batch_size: int, data_parallel_rank: int, data_parallel_size: int,
                 data_parallel_group: Any = None, gradient_accumulation_steps: int = 1,
                 global_rank: int = 0, drop_last: bool = True) -> None:  # fmt: skip
        cfg = copy.deepcopy(dict(data_efficiency_config))
        sampling = cfg.get("data_sampling", {})
        curriculum = sampling.get("curriculum_learning", {})
        if not curriculum.get("enabled", False):
            raise DataConfigError(
                "DeepSpeedDataSampler draws by a curriculum: set "
                "data_efficiency.data_sampling.curriculum_learning.enabled to true"
            )
        if micro_batch_size <= 0 or data_parallel_size <= 0:
            raise DataConfigError("micro_batch_size and data_parallel_size must be positive")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise DataConfigError(
                f"data_parallel_rank {data_parallel_rank} must be below data_parallel_size "
                f"{data_parallel_size}"
            )
        metrics = curriculum.get("curriculum_metrics")
        if not isinstance(metrics, Mapping) or not metrics:
            raise DataConfigError(
                "data_efficiency.data_sampling.curriculum_learning needs 'curriculum_metrics' "
                "(one schedule per metric computed by DataAnalyzer)"
            )
        if "data_cluster_path" not in curriculum:
            raise DataConfigError(
                "data_efficiency.data_sampling.curriculum_learning needs 'data_cluster_path' (a "
                "directory for the sampler's clusters, shared by the ranks)"
            )
        self.data_efficiency_config = cfg
        self.one_epoch_total_samples = one_epoch_total_samples
        self.index_dtype = find_fit_int_dtype(0, one_epoch_total_samples)
        self.total_samples = one_epoch_total_samples * sampling.get("num_epochs", 1000)
        if self.total_samples <= 0:
            raise DataConfigError(f"no samples to draw: {one_epoch_total_samples} per epoch")
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.data_parallel_group = data_parallel_group
        self.micro_batch_times_data_parallel_size = micro_batch_size * data_parallel_size
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.global_batch_size = (
            self.micro_batch_times_data_parallel_size * gradient_accumulation_steps
        )
        self.global_rank = global_rank
        self.drop_last = drop_last
        self.np_rng = np.random.default_rng(cfg.get("seed", 1234))
        self.batch: list[int] = []
        self.consumed_samples = 0
        self.curriculum_step = 0
        self.current_difficulties: dict[str, Any] = {}
        self.data_cluster_paths: list[str] = []
        self.data_cluster_current_position: list[int] = []
        self.data_clusters: list[np.ndarray] = []
        self.data_cluster_sizes: list[int] = []
        self.cluster_root = Path(curriculum["data_cluster_path"])
        self.curriculum_schedulers: dict[str, CurriculumScheduler] = {}
        self.difficulty_type: dict[str, str] = {}
        self.clustering_type: dict[str, str] = {}
        self.curriculum_index_to_sample: dict[str, IndexedRows] = {}
        self.curriculum_index_to_metric: dict[str, IndexedRows] = {}
        self.data_1epoch_size: int | None = None
        for metric, mcfg in metrics.items():
            self.curriculum_schedulers[metric] = CurriculumScheduler(mcfg)
            kind = mcfg.get("difficulty_type")
            if kind not in (_VALUE, _PERCENTILE):
                raise DataConfigError(f"curriculum metric '{metric}': difficulty_type must be "
                                      f"'value' or 'percentile', got {kind!r}")  # fmt: skip
            self.difficulty_type[metric] = kind
            self.clustering_type[metric] = mcfg.get("clustering_type", "schedule_based")
            if self.clustering_type[metric] == _SINGLE:
                continue
            for key in ("index_to_sample_path",) + (
                ("index_to_metric_path",) if kind == _VALUE else ()
            ):
                if key not in mcfg:
                    raise DataConfigError(f"curriculum metric '{metric}' needs '{key}' (a "
                                          f"DataAnalyzer output prefix)")  # fmt: skip
            self.curriculum_index_to_sample[metric] = IndexedRows(mcfg["index_to_sample_path"])
            if kind == _VALUE:
                self.curriculum_index_to_metric[metric] = IndexedRows(mcfg["index_to_metric_path"])

    def __len__(self) -> int:
        return self.total_samples

    def set_custom_curriculum_learning_schedule(
        self, schedule_func_dict: Mapping[str, Callable]
    ) -> None:
        for metric, scheduler in self.curriculum_schedulers.items():
            if metric in schedule_func_dict:
                scheduler.set_custom_get_difficulty(schedule_func_dict[metric])

    def get_start_end_idx(self, batch_len: int | None = None) -> tuple[int, int]:
        """This rank's [start, end) within a micro-batch of ``batch_len`` (DeepSpeed's rounding)."""
        batch_len = batch_len or self.micro_batch_times_data_parallel_size
        start = round(self.data_parallel_rank * batch_len / self.data_parallel_size)
        end = round((self.data_parallel_rank + 1) * batch_len / self.data_parallel_size)
        return start, end

    # Clusters ----------------------------------------------------------------------------------
    def get_sample_based_on_metric_value(self, metric: str, value_start, value_end):
        rows, values = (
            self.curriculum_index_to_sample[metric],
            self.curriculum_index_to_metric[metric],
        )
        picked = [
            np.copy(rows[i]) for i in range(len(rows)) if value_start < values[i][0] <= value_end
        ]
        return np.concatenate(picked, axis=None) if picked else None

    def get_sample_based_on_metric_percentile(self, metric: str, percentile_start, percentile_end):
        rows = self.curriculum_index_to_sample[metric]
        if self.data_1epoch_size is None:
            self.data_1epoch_size = int(rows.sizes.sum())
        max_percentile = self.curriculum_schedulers[metric].state["max_difficulty"]
        per_percentile = self.data_1epoch_size // max_percentile
        start_count = per_percentile * percentile_start
        end_count = (
            self.data_1epoch_size
            if percentile_end == max_percentile
            else per_percentile * percentile_end
        )
        picked, seen = [], 0
        for i in range(len(rows)):
            size = int(rows.sizes[i])
            if seen + size > start_count:
                lo = max(0, start_count - seen)
                hi = size if seen + size <= end_count else end_count - seen
                picked.append(np.copy(rows[i][lo:hi]))
            seen += size
            if seen >= end_count:
                break
        return np.concatenate(picked, axis=None) if picked else None

    def _admitted(self, metric: str, lo, hi):
        if self.difficulty_type[metric] == _VALUE:
            return self.get_sample_based_on_metric_value(metric, lo, hi)
        return self.get_sample_based_on_metric_percentile(metric, lo, hi)

    def _cluster_name(self) -> str:
        return "cluster" + "".join(
            f"_{m}{self.current_difficulties[m]}" for m in self.curriculum_schedulers
        )

    def get_new_cluster(self, previous_difficulties: Mapping[str, Any]) -> None:
        everything = lambda: np.arange(0, self.one_epoch_total_samples, 1, dtype=self.index_dtype)  # noqa: E731
        clustered = [m for m in self.curriculum_schedulers if self.clustering_type[m] != _SINGLE]
        new = None
        if len(clustered) > 1:
            # Several metrics: the samples within every current difficulty, less those drawn
            # into earlier clusters.
            for metric in self.curriculum_schedulers:
                if self.clustering_type[metric] == _SINGLE:
                    part = everything()
                else:
                    floor = float("-inf") if self.difficulty_type[metric] == _VALUE else 0
                    part = self._admitted(metric, floor, self.current_difficulties[metric])
                new = part if new is None else np.intersect1d(new, part, assume_unique=True)
            for cluster in self.data_clusters:
                new = np.setdiff1d(new, cluster, assume_unique=True)
        else:
            if not self.data_clusters:
                new = everything()
            for metric in clustered:
                new = self._admitted(
                    metric, previous_difficulties[metric], self.current_difficulties[metric]
                )
        name = self._cluster_name()
        if new is not None and len(new) > 0:
            self.np_rng.shuffle(new)
            self._store_cluster(name, new)
            self.data_clusters.append(np.asarray(new))
            self.data_cluster_sizes.append(len(new))
            self.data_cluster_paths.append(name)
            self.data_cluster_current_position.append(0)
            _log.info("new data cluster %s (difficulties %s -> %s): %d samples", name,
                      dict(previous_difficulties), self.current_difficulties, len(new))  # fmt: skip
        else:
            _log.info("no samples between difficulties %s and %s: no new cluster",
                      dict(previous_difficulties), self.current_difficulties)  # fmt: skip

    def _store_cluster(self, name: str, cluster: np.ndarray) -> None:
        # Rank 0 keeps the clusters on disk for a resumed run; the ranks' in-memory copies are
        # identical (same generator), so nothing is sent between them.
        if self.global_rank == 0:
            write_rows(self.cluster_root / name, [cluster], self.index_dtype)

    def sample_from_clusters(self) -> np.ndarray:
        total = sum(self.data_cluster_sizes)
        weights = [size / total for size in self.data_cluster_sizes]
        picks = self.np_rng.choice(
            len(self.data_clusters), self.global_batch_size, replace=True, p=weights
        )
        return np.bincount(picks, minlength=len(self.data_clusters))

    def reshuffle_clusters(self, cidx: int) -> None:
        cluster = np.copy(self.data_clusters[cidx])
        self.np_rng.shuffle(cluster)
        self._store_cluster(self.data_cluster_paths[cidx], cluster)
        self.data_clusters[cidx] = cluster

    def get_sample_from_cluster(self, cidx: int, num_samples: int) -> list:
        start = self.data_cluster_current_position[cidx]
        samples = list(np.copy(self.data_clusters[cidx][start : start + num_samples]))
        self.data_cluster_current_position[cidx] += num_samples
        if len(samples) < num_samples:
            missing = num_samples - len(samples)
            self.reshuffle_clusters(cidx)
            samples += list(np.copy(self.data_clusters[cidx][:missing]))
            self.data_cluster_current_position[cidx] = missing
        return samples

    def get_next_global_batch(self) -> None:
        self.curriculum_step += 1
        changed = False
        previous: dict[str, Any] = {}
        for metric, scheduler in self.curriculum_schedulers.items():
            difficulty = scheduler.update_difficulty(self.curriculum_step)
            if self.current_difficulties.get(metric, object()) != difficulty:
                changed = True
            if metric in self.current_difficulties:
                previous[metric] = self.current_difficulties[metric]
            else:
                previous[metric] = float("-inf") if self.difficulty_type[metric] == _VALUE else 0
            self.current_difficulties[metric] = difficulty
        if changed:
            self.get_new_cluster(previous)
        if not self.data_clusters:
            raise RuntimeError(
                f"no sample has a difficulty within {self.current_difficulties}: raise "
                f"min_difficulty or check the metric's index files"
            )
        counts = self.sample_from_clusters()
        batch: list = []
        for cidx in range(len(counts)):
            batch += self.get_sample_from_cluster(cidx, int(counts[cidx]))
        self.np_rng.shuffle(batch)
        self.batch = [int(i) for i in batch]

    def __iter__(self) -> Iterator[list[int]]:
        while self.consumed_samples <= self.total_samples:
            if not self.batch:
                self.get_next_global_batch()
            step = self.micro_batch_times_data_parallel_size
            current, self.batch = self.batch[:step], self.batch[step:]
            if len(current) == step or (current and not self.drop_last):
                start, end = self.get_start_end_idx(len(current))
                yield current[start:end]
                self.consumed_samples += len(current)

    # Checkpoint state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: position in the schedule, the clusters' names and positions,
        the generator's state."""
        return {
            "batch": list(self.batch),
            "consumed_samples": self.consumed_samples,
            "curriculum_step": self.curriculum_step,
            "current_difficulties": dict(self.current_difficulties),
            "data_cluster_paths": list(self.data_cluster_paths),
            "data_cluster_current_position": list(self.data_cluster_current_position),
            "np_rng_state": self.np_rng.bit_generator.state,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.batch = list(state_dict["batch"])
        self.consumed_samples = state_dict["consumed_samples"]
        self.curriculum_step = state_dict["curriculum_step"]
        self.current_difficulties = dict(state_dict["current_difficulties"])
        self.data_cluster_paths = [os.path.basename(p) for p in state_dict["data_cluster_paths"]]
        self.data_cluster_current_position = list(state_dict["data_cluster_current_position"])
        rng_state = state_dict["np_rng_state"]
        if not isinstance(rng_state, Mapping):
            raise DataConfigError(
                "sampler state 'np_rng_state' is numpy's global-generator tuple (a DeepSpeed "
                "checkpoint); that run's generator was not saved, so it cannot resume exactly"
            )
        self.np_rng.bit_generator.state = dict(rng_state)
        # The schedulers resume where the batches were: their difficulty is the current one.
        for metric, scheduler in self.curriculum_schedulers.items():
            if metric in self.current_difficulties:
                scheduler.set_current_difficulty(self.current_difficulties[metric])
        self.data_clusters = [np.asarray(IndexedRows(self.cluster_root / name)[0]).copy()
                              for name in self.data_cluster_paths]  # fmt: skip
        self.data_cluster_sizes = [len(c) for c in self.data_clusters]
