"""``deepspeed.monitor.monitor``: ``MonitorMaster(monitor_config)`` fans events out to the
enabled monitors, on global rank 0 only (ds_all's CSV and TensorBoard writers).

Events are ``(name, value, step)`` tuples, as DeepSpeed's engine writes them
(``"Train/Samples/train_loss"``). W&B and Comet are not written by ds_all: enabling them warns.
"""

from __future__ import annotations

import abc
import warnings
from typing import Any

import torch.distributed as dist

from ds_all._monitor import CSVMonitor, TensorBoardMonitor


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class Monitor(abc.ABC):
    """DeepSpeed's monitor interface: built from a config, takes lists of events."""

    @abc.abstractmethod
    def __init__(self, monitor_config: Any) -> None:
        self.monitor_config = monitor_config

    @abc.abstractmethod
    def write_events(self, event_list: list[tuple[str, float, int]]) -> None: ...


class MonitorMaster(Monitor):
    """The monitors ``monitor_config`` (a ``DeepSpeedMonitorConfig``) enables."""

    tb_monitor: TensorBoardMonitor | None
    csv_monitor: CSVMonitor | None
    wandb_monitor: None
    comet_monitor: None

    def __init__(self, monitor_config: Any) -> None:
        super().__init__(monitor_config)
        self.tb_monitor = self.csv_monitor = None
        self.wandb_monitor = self.comet_monitor = None
        self.enabled = bool(monitor_config.enabled)
        if _rank() != 0:
            return
        tb, csv = monitor_config.tensorboard, monitor_config.csv_monitor
        if tb.enabled:
            self.tb_monitor = TensorBoardMonitor(tb.output_path, tb.job_name)
        if csv.enabled:
            self.csv_monitor = CSVMonitor(csv.output_path, csv.job_name)
        for name in ("wandb", "comet"):
            if getattr(monitor_config, name).enabled:
                warnings.warn(
                    f"{name} monitoring is not supported by ds_all; its events are not written "
                    "(use csv_monitor or tensorboard)",
                    stacklevel=2,
                )

    def write_events(self, event_list: list[tuple[str, float, int]]) -> None:
        if _rank() != 0:
            return
        for m in (self.tb_monitor, self.csv_monitor):
            if m is not None:
                m.write_events(event_list)


__all__ = ["Monitor", "MonitorMaster"]
