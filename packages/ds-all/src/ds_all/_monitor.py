"""Training monitors: CSV files and TensorBoard (when installed), written by rank 0 only.

Events are (name, value, step) triples, DeepSpeed's ``Train/Samples/train_loss`` style names.
"""

from __future__ import annotations

import csv
import os
import warnings
from typing import Any, Protocol

from ds_all._paths import check_output_dir, make_output_dir


class Monitor(Protocol):
    def write_events(self, events: list[tuple[str, float, int]]) -> None: ...

    def close(self) -> None: ...


class CSVMonitor:
    """One CSV file per event name under ``output_path/job_name/`` (DeepSpeed's layout)."""

    def __init__(self, output_path: str, job_name: str) -> None:
        self.folder = os.path.join(output_path or "csv_monitor", job_name)
        make_output_dir(self.folder, "csv_monitor.output_path")

    def write_events(self, events: list[tuple[str, float, int]]) -> None:
        for name, value, step in events:
            path = os.path.join(self.folder, name.replace("/", "_") + ".csv")
            new = not os.path.exists(path)
            with open(path, "a", newline="") as f:
                w = csv.writer(f)
                if new:
                    w.writerow(["step", name])
                w.writerow([step, value])

    def close(self) -> None:
        pass


class TensorBoardMonitor:
    """TensorBoard scalars; a warning (not an error) when tensorboard is not installed."""

    def __init__(self, output_path: str, job_name: str) -> None:
        self.writer: Any = None
        log_dir = os.path.join(output_path or "runs", job_name)
        check_output_dir(log_dir, "tensorboard.output_path")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            warnings.warn("tensorboard.enabled is true but tensorboard is not installed "
                          "(pip install tensorboard); TensorBoard events are not written", stacklevel=2)  # fmt: skip
            return
        self.writer = SummaryWriter(log_dir=log_dir)

    def write_events(self, events: list[tuple[str, float, int]]) -> None:
        if self.writer is None:
            return
        for name, value, step in events:
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class MonitorMaster:
    """All enabled monitors; a no-op on ranks other than 0."""

    def __init__(self, config: Any, rank: int) -> None:
        self.monitors: list[Monitor] = []
        if rank != 0:
            return
        if config.csv_monitor.enabled:
            self.monitors.append(
                CSVMonitor(config.csv_monitor.output_path, config.csv_monitor.job_name)
            )
        if config.tensorboard.enabled:
            self.monitors.append(
                TensorBoardMonitor(config.tensorboard.output_path, config.tensorboard.job_name)
            )
        if config.wandb.enabled:
            warnings.warn(
                "wandb monitoring is not supported by ds_all; use csv_monitor or tensorboard",
                stacklevel=2,
            )

    @property
    def enabled(self) -> bool:
        return bool(self.monitors)

    def write_events(self, events: list[tuple[str, float, int]]) -> None:
        for m in self.monitors:
            m.write_events(events)

    def close(self) -> None:
        for m in self.monitors:
            m.close()
