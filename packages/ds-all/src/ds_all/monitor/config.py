"""``deepspeed.monitor.config``: the ``tensorboard``, ``wandb``, ``csv_monitor`` and ``comet``
sections, with DeepSpeed's field names and defaults.

The TensorBoard, CSV and W&B models are the sections of ds_all's own config. ``comet`` is
parsed (DeepSpeed's keys) but not written to: ds_all has no Comet writer, and
``MonitorMaster`` warns when it is enabled, as it does for W&B.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from ds_all._config import CSVMonitorSection as CSVConfig
from ds_all._config import TensorBoardSection as TensorBoardConfig
from ds_all._config import WandbSection as WandbConfig
from ds_all._config_base import Section


class CometConfig(Section):
    """DeepSpeed's ``comet`` section (parsed; ds_all writes no Comet events)."""

    path = "comet"
    auto_is_default = True
    enabled: bool = False
    samples_log_interval: int = 100
    project: str | None = None
    workspace: str | None = None
    api_key: str | None = None
    experiment_name: str | None = None
    experiment_key: str | None = None
    online: bool | None = None
    mode: str | None = None


class DeepSpeedMonitorConfig(Section):
    """All monitor sections; ``enabled`` is true when any of them is."""

    path = ""
    tensorboard: TensorBoardConfig = Field(default_factory=TensorBoardConfig)
    comet: CometConfig = Field(default_factory=CometConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    csv_monitor: CSVConfig = Field(default_factory=CSVConfig)

    @property
    def enabled(self) -> bool:
        return (
            self.tensorboard.enabled
            or self.wandb.enabled
            or self.csv_monitor.enabled
            or self.comet.enabled
        )


def get_monitor_config(param_dict: dict[str, Any]) -> DeepSpeedMonitorConfig:
    """The monitor sections of a whole DeepSpeed config dict (missing ones: defaults)."""
    keys = ("tensorboard", "wandb", "csv_monitor", "comet")
    return DeepSpeedMonitorConfig(**{k: param_dict.get(k, {}) for k in keys})


__all__ = [
    "CSVConfig",
    "CometConfig",
    "DeepSpeedMonitorConfig",
    "TensorBoardConfig",
    "WandbConfig",
    "get_monitor_config",
]
