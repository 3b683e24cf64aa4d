"""``deepspeed.monitor.monitor``: ``MonitorMaster(monitor_config)`` fans events out to the
enabled monitors, on global rank 0 only (ds_all's CSV and TensorBoard writers).

Events are ``(name, value, step)`` tuples, as DeepSpeed's engine writes them
(``"Train/Samples/train_loss"``). W&B and Comet are not written by ds_all: enabling them warns.
"""

from __future__ import annotations

import abc
import warnings
from typing import Any

from ds_all._monitor import CSVMonitor, TensorBoardMonitor
from ds_all._monitor import MonitorMaster as _EngineMonitors
from ds_all.utils.logging import _rank


class Monitor(abc.ABC):
    """DeepSpeed's monitor interface: built from a config, takes lists of events."""

    @abc.abstractmethod
    def __init__(self, monitor_config: Any) -> None:
        self.monitor_config = monitor_config

    @abc.abstractmethod
    def write_events(self, event_list: list[tuple[str, float, int]]) -> None: ...


class MonitorMaster(Monitor):
    """The monitors ``monitor_config`` (a ``DeepSpeedMonitorConfig``) enables: the engine's
    own set of writers (``ds_all._monitor``), with DeepSpeed's attribute names."""

    tb_monitor: TensorBoardMonitor | None
    csv_monitor: CSVMonitor | None
    wandb_monitor: None
    comet_monitor: None

    def __init__(self, monitor_config: Any) -> None:
        super().__init__(monitor_config)
        self.enabled = bool(monitor_config.enabled)
        self._monitors = _EngineMonitors(monitor_config, _rank())
        writers = self._monitors.monitors
        self.tb_monitor = next((m for m in writers if isinstance(m, TensorBoardMonitor)), None)
        self.csv_monitor = next((m for m in writers if isinstance(m, CSVMonitor)), None)
        self.wandb_monitor = self.comet_monitor = None
        if monitor_config.comet.enabled and _rank() == 0:  # the engine's set warns for wandb
            warnings.warn(
                "comet monitoring is not supported by ds_all; its events are not written "
                "(use csv_monitor or tensorboard)",
                stacklevel=2,
            )

    def write_events(self, event_list: list[tuple[str, float, int]]) -> None:
        self._monitors.write_events(event_list)  # no writers on ranks other than 0


__all__ = ["Monitor", "MonitorMaster"]
