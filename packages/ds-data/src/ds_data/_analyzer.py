"""DataAnalyzer: per-sample difficulty computed by worker processes, merged into index files.

Map: the dataset is split into ``num_workers`` contiguous shares (one per machine or job, chosen
by ``worker_id``), each split again into ``num_threads`` processes. Each process iterates its
slice in order, calls every metric function on each batch and writes its partial results as
index files under ``save_path/<metric>/worker<w>_thread<t>/``.

Reduce: one process reads every partial result in (worker, thread) order and writes, per metric,
DeepSpeed's outputs: ``<metric>_sample_to_metric`` (one value per sample, in dataset order),
``<metric>_index_to_metric`` (the distinct values, ascending), ``<metric>_index_to_sample``
(for each distinct value, its samples) and ``<metric>_index_to_sample_percentile_merged`` (the
same rows merged so that there are about 100); an ``accumulate_value_over_samples`` metric
becomes ``<metric>_metric_value`` (the sum). Workers exchange nothing but these files.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, Subset

from ._errors import DataConfigError
from ._index_file import IndexedRows, find_fit_int_dtype, write_rows

__all__ = ["DataAnalyzer", "split_index"]

_log = logging.getLogger(__name__)
_TYPES = ("single_value_per_sample", "accumulate_value_over_samples")


def split_index(start: int, end: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges covering [start, end), DeepSpeed's split (``np.linspace``)."""
    bounds = np.linspace(start, end, dtype=int, num=parts + 1)
    return [(int(bounds[i]), int(bounds[i + 1])) for i in range(parts)]


def _as_array(values: Any, name: str) -> np.ndarray:
    if torch.is_tensor(values):
        return values.detach().cpu().numpy()
    if isinstance(values, np.ndarray):
        return values
    raise TypeError(f"metric function of '{name}' must return a tensor or a numpy array, got "
                    f"{type(values).__name__}")  # fmt: skip


class DataAnalyzer:
    """DeepSpeed's DataAnalyzer (same constructor, ``run_map``/``run_reduce``/``run_map_reduce``,
    same output files); see the module docstring for the layout.

    ``metric_functions[i](batch)`` returns one value per sample (``single_value_per_sample``;
    integers, as difficulties are bucketed by value) or an array to sum over the dataset
    (``accumulate_value_over_samples``). ``sample_indices`` maps the iteration position to the
    sample id to record; a batch that is a dict with an ``'index'`` entry supplies the ids
    itself (Megatron's datasets). DeepSpeed's custom map/reduce hooks operate on its internal
    builders and are refused.
    """

    def __init__(self, dataset, num_workers: int = 1, worker_id: int = 0, num_threads: int = 1,
                 num_threads_reduce: int = 1, specific_threads: Sequence[int] = (),
                 batch_size: int = 1, metric_names: Sequence[str] = (),
                 metric_functions: Sequence[Callable[[Any], Any]] = (),
                 metric_types: Sequence[str] = (), metric_dtypes: Sequence[Any] = (),
                 save_path: str | os.PathLike = "./", collate_fn=None, custom_map_init=None,
                 custom_map_update=None, custom_map_finalize=None, custom_reduce=None,
                 sample_indices: Sequence[int] | None = None) -> None:  # fmt: skip
        hooks = {"custom_map_init": custom_map_init, "custom_map_update": custom_map_update,
                 "custom_map_finalize": custom_map_finalize, "custom_reduce": custom_reduce}  # fmt: skip
        given = [k for k, v in hooks.items() if v is not None]
        if given:
            raise DataConfigError(
                f"DataAnalyzer: {', '.join(given)} are not supported (DeepSpeed's hooks write its "
                f"internal builders); express the metric as a metric function instead"
            )
        if not len(metric_names) == len(metric_functions) == len(metric_types):
            raise DataConfigError("DataAnalyzer: metric_names, metric_functions and metric_types "
                                  "need one entry per metric")  # fmt: skip
        for name, kind in zip(metric_names, metric_types):
            if kind not in _TYPES:
                raise DataConfigError(
                    f"DataAnalyzer: metric '{name}' has type {kind!r}; use one of {_TYPES}"
                )
        if not 0 <= worker_id < num_workers or num_threads < 1:
            raise DataConfigError(f"DataAnalyzer: worker_id {worker_id} must be in [0, "
                                  f"{num_workers}) and num_threads >= 1")  # fmt: skip
        self.dataset = dataset
        self.num_workers = num_workers
        self.worker_id = worker_id
        self.num_threads = num_threads
        self.num_threads_reduce = num_threads_reduce
        self.specific_threads = list(specific_threads)
        self.batch_size = batch_size
        self.metric_names = list(metric_names)
        self.metric_functions = list(metric_functions)
        self.metric_types = list(metric_types)
        self.metric_dtypes = list(metric_dtypes)
        self.save_path = Path(save_path)
        self.collate_fn = collate_fn
        self.sample_indices = sample_indices

    # Map ---------------------------------------------------------------------------------------
    def _thread_dir(self, metric: str, worker: int, thread: int) -> Path:
        return self.save_path / metric / f"worker{worker}_thread{thread}"

    def _thread_range(self, thread: int) -> tuple[int, int]:
        share = split_index(0, len(self.dataset), self.num_workers)[self.worker_id]
        return split_index(share[0], share[1], self.num_threads)[thread]

    def run_map_helper(self, thread_id: int) -> None:
        """Computes the metrics of one thread's slice and writes its partial index files."""
        start, end = self._thread_range(thread_id)
        subset = Subset(self.dataset, list(range(start, end)))
        batches = BatchSampler(
            SequentialSampler(subset), batch_size=self.batch_size, drop_last=False
        )
        loader = DataLoader(
            subset, batch_sampler=batches, num_workers=0, collate_fn=self.collate_fn
        )
        per_sample: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in self.metric_names]
        totals: list[np.ndarray | None] = [None for _ in self.metric_names]
        position = start
        for batch in loader:
            for m, (name, fn, kind) in enumerate(zip(self.metric_names, self.metric_functions,
                                                     self.metric_types)):  # fmt: skip
                values = _as_array(fn(batch), name)
                if kind == "accumulate_value_over_samples":
                    totals[m] = values.copy() if totals[m] is None else totals[m] + values
                    continue
                values = values.reshape(len(values), -1)[:, 0]
                ids = self._sample_ids(batch, position, len(values))
                per_sample[m].append((ids, values))
            position += len(batch)
        for m, (name, kind) in enumerate(zip(self.metric_names, self.metric_types)):
            out = self._thread_dir(name, self.worker_id, thread_id)
            if kind == "accumulate_value_over_samples":
                if totals[m] is not None:
                    out.mkdir(parents=True, exist_ok=True)
                    np.save(out / f"{name}_metric_value.npy", totals[m], allow_pickle=False)
                continue
            ids = (
                np.concatenate([i for i, _ in per_sample[m]])
                if per_sample[m]
                else np.zeros(0, np.int64)
            )
            vals = (
                np.concatenate([v for _, v in per_sample[m]])
                if per_sample[m]
                else np.zeros(0, np.int64)
            )
            integral = np.issubdtype(vals.dtype, np.integer) or bool(np.all(vals == np.round(vals)))
            if vals.size and not integral:
                raise TypeError(f"metric '{name}' must give integer values (difficulties are "
                                f"bucketed by value), got {vals.dtype}")  # fmt: skip
            write_rows(out / f"{name}_sample_ids", [ids], np.int64)
            write_rows(out / f"{name}_values", [vals], np.int64)

    def _sample_ids(self, batch, position: int, n: int) -> np.ndarray:
        if isinstance(batch, dict) and "index" in batch:
            return np.asarray([int(batch["index"][row][0]) for row in range(n)], dtype=np.int64)
        ids = np.arange(position, position + n, dtype=np.int64)
        if self.sample_indices is not None:
            ids = np.asarray([self.sample_indices[i] for i in ids], dtype=np.int64)
        return ids

    def run_map(self) -> None:
        """Runs this worker's share, one process per thread (in this process when there is one)."""
        threads = self.specific_threads or list(range(self.num_threads))
        if self.num_threads == 1:
            self.run_map_helper(0)
            return
        # fork keeps lambdas and closures usable as metric functions; spawn elsewhere.
        method = "fork" if sys.platform.startswith("linux") else "spawn"
        ctx = multiprocessing.get_context(method)
        procs = [ctx.Process(target=self.run_map_helper, args=(t,)) for t in threads]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        failed = [t for t, p in zip(threads, procs) if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"DataAnalyzer worker {self.worker_id}: map threads {failed} failed "
                               f"(exit codes {[procs[threads.index(t)].exitcode for t in failed]})")  # fmt: skip

    # Reduce ------------------------------------------------------------------------------------
    def _partials(self, name: str) -> list[Path]:
        dirs = [self._thread_dir(name, w, t)
                for w in range(self.num_workers) for t in range(self.num_threads)]  # fmt: skip
        return dirs

    def run_reduce(self) -> None:
        """Merges every worker's and thread's partial results into the metric's index files."""
        total = len(self.dataset)
        sample_dtype = find_fit_int_dtype(0, total - 1)
        for name, kind in zip(self.metric_names, self.metric_types):
            root = self.save_path / name
            if kind == "accumulate_value_over_samples":
                self._reduce_accumulated(name, root)
                continue
            ids_parts, value_parts = [], []
            for d in self._partials(name):
                if not (d / f"{name}_values.idx").is_file():
                    raise FileNotFoundError(f"DataAnalyzer: {d} has no map result for '{name}': "
                                            f"run run_map on every worker first")  # fmt: skip
                ids_parts.append(np.asarray(IndexedRows(d / f"{name}_sample_ids")[0]))
                value_parts.append(np.asarray(IndexedRows(d / f"{name}_values")[0]))
            ids, values = np.concatenate(ids_parts), np.concatenate(value_parts)
            if len(values) != total:
                raise RuntimeError(f"DataAnalyzer: '{name}' has {len(values)} results for {total} "
                                   f"samples; a map worker did not finish")  # fmt: skip
            value_dtype = find_fit_int_dtype(int(values.min()), int(values.max()))
            # DeepSpeed's reduce merges a per-thread file into each output, which leaves the
            # document index [0, n, n]; recorded the same so the files are byte-identical.
            merged_docs = [0, len(values), len(values)]
            write_rows(root / f"{name}_sample_to_metric", ([v] for v in values), value_dtype,
                       merged_docs)  # fmt: skip
            unique = np.unique(values)
            # A stable sort keeps each value's samples in (worker, thread, iteration) order.
            order = np.argsort(values, kind="stable")
            bounds = np.searchsorted(values[order], unique, side="left").tolist() + [len(values)]
            rows = [ids[order[bounds[i] : bounds[i + 1]]] for i in range(len(unique))]
            docs = [0, len(unique), len(unique)]
            write_rows(root / f"{name}_index_to_sample", rows, sample_dtype, docs)
            write_rows(root / f"{name}_index_to_metric", ([u] for u in unique), value_dtype, docs)
            step = max(1, len(rows) // 100)
            merged = (np.concatenate(rows[i : i + step]) for i in range(0, len(rows), step))
            write_rows(root / f"{name}_index_to_sample_percentile_merged", merged, sample_dtype)
            _log.info("metric %s: %d samples, %d distinct values in [%s, %s]", name, total,
                      len(unique), unique[0], unique[-1])  # fmt: skip

    def _reduce_accumulated(self, name: str, root: Path) -> None:
        total = None
        for d in self._partials(name):
            f = d / f"{name}_metric_value.npy"
            if f.is_file():
                part = np.load(f, allow_pickle=False)
                total = part.astype(np.int64) if total is None else total + part.astype(np.int64)
        if total is None:
            raise FileNotFoundError(f"DataAnalyzer: no map result for '{name}' under {root}")
        dtype = find_fit_int_dtype(int(total.min()), int(total.max()))
        write_rows(root / f"{name}_metric_value", [total.reshape(-1)], dtype)

    def run_map_reduce(self, comm_group=None) -> None:
        """Map on every rank of ``comm_group``, reduce on worker 0 (barriers around it)."""
        import torch.distributed as dist

        self.run_map()
        if dist.is_available() and dist.is_initialized():
            dist.barrier(group=comm_group)
        if self.worker_id == 0:
            self.run_reduce()
        if dist.is_available() and dist.is_initialized():
            dist.barrier(group=comm_group)
