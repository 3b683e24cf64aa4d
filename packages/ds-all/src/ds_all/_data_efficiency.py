"""The engine's data-efficiency features (ds-data): legacy curriculum learning, progressive
layer drop, random-LTD, curriculum data sampling, and the sparse_attention section.

What DeepSpeed's engine does, and when:
- legacy ``curriculum_learning``: each training forward advances the scheduler to
  ``global_steps + 1`` and, for ``curriculum_type`` "seqlen", passes the difficulty to the
  model as the ``curriculum_seqlen`` keyword (the model truncates its sequence);
- ``progressive_layer_drop``: each training forward passes ``progressive_layer_drop=True`` and
  ``pld_theta``; the theta is updated at each accumulation boundary from ``global_steps``
  before the step increments it;
- ``data_efficiency.data_routing.random_ltd``: the scheduler advances at each training forward
  (``update_seq(global_steps)``); ``engine.random_ltd_initialize()`` (called by
  ``convert_to_random_ltd(engine, LayerClass)``) attaches it to the wrapped layers;
- ``data_efficiency.data_sampling.curriculum_learning``: ``initialize(training_data=...)``
  returns a loader drawing batches with ``DeepSpeedDataSampler``;
- ``sparse_attention``: parsed with DeepSpeed's defaults for the model to read
  (``engine.sparse_attention_config()``, ``engine.sparsity_config(num_heads)``).
The schedulers' and the sampler's states are saved with the engine's checkpoint state.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader

import ds_data
from ds_all._config_base import ConfigError

__all__ = [
    "DataEfficiency",
    "DataEfficiencyEngineMixin",
    "check_data_sections",
    "refuse_with_pipeline",
]


def _parsed(cfg: Any) -> dict[str, Any]:
    """The four sections, checked (ConfigError naming the key on bad input)."""
    try:
        return {
            "curriculum_learning": ds_data.legacy_curriculum_config(cfg.curriculum_learning),
            "progressive_layer_drop": ds_data.progressive_layer_drop_config(
                cfg.progressive_layer_drop
            ),
            "data_efficiency": ds_data.data_efficiency_config(cfg.data_efficiency),
            "sparse_attention": ds_data.sparse_attention_config(cfg.sparse_attention),
        }
    except ds_data.DataConfigError as exc:
        raise ConfigError(str(exc)) from None


def check_data_sections(cfg: Any) -> None:
    """Validates the data-efficiency sections of a loaded config (called by its loader)."""
    _parsed(cfg)


def refuse_with_pipeline(cfg: Any) -> None:
    """A PipelineModule's engine cannot pass forward keywords or draw a curriculum; DeepSpeed
    skips them silently there, this refuses them."""
    p = _parsed(cfg)
    de = p["data_efficiency"]
    used = [name for name, on in (
        ("curriculum_learning", p["curriculum_learning"] is not None),
        ("progressive_layer_drop", p["progressive_layer_drop"] is not None),
        ("data_efficiency.data_sampling.curriculum_learning",
         de["data_sampling"]["curriculum_learning"]["enabled"]),
        ("data_efficiency.data_routing.random_ltd", de["data_routing"]["random_ltd"]["enabled"]),
    ) if on]  # fmt: skip
    if used:
        raise ConfigError(f"{', '.join(used)}: not supported with a PipelineModule (the pipeline "
                          f"engine cannot pass them to the stages); disable them for pipelines")  # fmt: skip


class DataEfficiency:
    """The engine's schedulers and sampler for these features (None where disabled)."""

    curriculum_scheduler_legacy: ds_data.CurriculumScheduler | None
    progressive_layer_drop: ds_data.ProgressiveLayerDrop | None
    random_ltd_scheduler: ds_data.RandomLTDScheduler | None
    data_sampler: ds_data.DeepSpeedDataSampler | None

    def __init__(self, cfg: Any, train_batch: int, micro_batch: int) -> None:
        p = _parsed(cfg)
        self.sections = p
        legacy = p["curriculum_learning"]
        self.curriculum_scheduler_legacy = ds_data.CurriculumScheduler(legacy) if legacy else None
        pld = p["progressive_layer_drop"]
        self.progressive_layer_drop = ds_data.ProgressiveLayerDrop(**pld) if pld else None
        ltd = p["data_efficiency"]["data_routing"]["random_ltd"]
        if ltd["enabled"]:
            ltd.update(global_batch_size=train_batch, micro_batch_size=micro_batch)
            self.random_ltd_scheduler = ds_data.RandomLTDScheduler(ltd)
        else:
            self.random_ltd_scheduler = None
        self.data_sampler = None

    # ---------------------------------------------------------------- per step
    def forward_kwargs(
        self, training: bool, global_steps: int, kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        if not training:
            return kwargs
        if self.progressive_layer_drop is not None:
            kwargs.update(self.progressive_layer_drop.get_state())
        legacy = self.curriculum_scheduler_legacy
        if legacy is not None:
            legacy.update_difficulty(global_steps + 1)
            if self.sections["curriculum_learning"]["curriculum_type"] == "seqlen":
                kwargs["curriculum_seqlen"] = legacy.get_current_difficulty()
        if self.random_ltd_scheduler is not None:
            self.random_ltd_scheduler.update_seq(global_steps)
        return kwargs

    def on_boundary(self, global_steps: int) -> None:
        """At an accumulation boundary, before ``global_steps`` is incremented."""
        if self.progressive_layer_drop is not None:
            self.progressive_layer_drop.update_state(global_steps)

    # ---------------------------------------------------------------- data
    def dataloader(self, dataset: Any, micro_batch: int, dp_rank: int, dp_size: int, gas: int,
                   global_rank: int, collate_fn: Any, drop_last: bool) -> DataLoader | None:  # fmt: skip
        """The curriculum loader (None when curriculum sampling is off)."""
        de = self.sections["data_efficiency"]
        if not de["data_sampling"]["curriculum_learning"]["enabled"]:
            return None
        self.data_sampler = ds_data.DeepSpeedDataSampler(
            de, len(dataset), micro_batch, dp_rank, dp_size, None, gas, global_rank,
            drop_last=drop_last,
        )  # fmt: skip
        sampling = de["data_sampling"]
        return DataLoader(dataset, batch_sampler=self.data_sampler, collate_fn=collate_fn,
                          num_workers=sampling["num_workers"], pin_memory=sampling["pin_memory"])  # fmt: skip

    # ---------------------------------------------------------------- checkpoint state
    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.curriculum_scheduler_legacy is not None:
            out["curriculum_scheduler_legacy"] = self.curriculum_scheduler_legacy.state_dict()
        if self.progressive_layer_drop is not None:
            out["progressive_layer_drop"] = self.progressive_layer_drop.state_dict()
        if self.random_ltd_scheduler is not None:
            out["random_ltd"] = self.random_ltd_scheduler.state_dict()
        if self.data_sampler is not None:
            out["data_sampler"] = self.data_sampler.state_dict()
        return out

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        state = state or {}
        pairs = (("curriculum_scheduler_legacy", self.curriculum_scheduler_legacy),
                 ("progressive_layer_drop", self.progressive_layer_drop),
                 ("random_ltd", self.random_ltd_scheduler), ("data_sampler", self.data_sampler))  # fmt: skip
        for key, owner in pairs:
            if owner is not None and key in state:
                owner.load_state_dict(state[key])


class DataEfficiencyEngineMixin:
    """DeepSpeed's engine methods for these features; the engine sets ``_data_efficiency``."""

    _data_efficiency: DataEfficiency

    @property
    def curriculum_scheduler_legacy(self) -> ds_data.CurriculumScheduler | None:
        return self._data_efficiency.curriculum_scheduler_legacy

    @property
    def progressive_layer_drop(self) -> ds_data.ProgressiveLayerDrop | None:
        return self._data_efficiency.progressive_layer_drop

    @property
    def random_ltd_scheduler(self) -> ds_data.RandomLTDScheduler | None:
        return self._data_efficiency.random_ltd_scheduler

    def curriculum_enabled_legacy(self) -> bool:
        return self._data_efficiency.curriculum_scheduler_legacy is not None

    def curriculum_params_legacy(self) -> dict[str, Any] | None:
        return self._data_efficiency.sections["curriculum_learning"]

    def pld_enabled(self) -> bool:
        return self._data_efficiency.progressive_layer_drop is not None

    def pld_params(self) -> dict[str, Any] | None:
        return self._data_efficiency.sections["progressive_layer_drop"]

    def pld_theta(self) -> float:
        return self.pld_params()["theta"]

    def pld_gamma(self) -> float:
        return self.pld_params()["gamma"]

    def get_pld_theta(self) -> float | None:
        pld = self._data_efficiency.progressive_layer_drop
        return pld.get_theta() if pld is not None else None

    def data_efficiency_enabled(self) -> bool:
        return self._data_efficiency.sections["data_efficiency"]["enabled"]

    def data_efficiency_config(self) -> dict[str, Any]:
        return self._data_efficiency.sections["data_efficiency"]

    def data_sampling_enabled(self) -> bool:
        return self.data_efficiency_config()["data_sampling"]["enabled"]

    def data_sampling_config(self) -> dict[str, Any]:
        return self.data_efficiency_config()["data_sampling"]

    def curriculum_learning_enabled(self) -> bool:
        return self.data_sampling_config()["curriculum_learning"]["enabled"]

    def curriculum_learning_config(self) -> dict[str, Any]:
        return self.data_sampling_config()["curriculum_learning"]

    def random_ltd_enabled(self) -> bool:
        return self._data_efficiency.random_ltd_scheduler is not None

    def random_ltd_config(self) -> dict[str, Any]:
        return self.data_efficiency_config()["data_routing"]["random_ltd"]

    def random_ltd_initialize(self) -> None:
        if self._data_efficiency.random_ltd_scheduler is None:
            raise ConfigError("random_ltd_initialize: data_efficiency.data_routing.random_ltd is not "
                              "enabled in the config")  # fmt: skip
        try:
            ds_data.random_ltd_initialize(self.module, self.random_ltd_config(),
                                          self._data_efficiency.random_ltd_scheduler)  # fmt: skip
        except ds_data.DataConfigError as exc:
            raise ConfigError(str(exc)) from None

    def set_custom_curriculum_learning_schedule(self, schedule_func_dict: dict[str, Any]) -> None:
        sampler = self._data_efficiency.data_sampler
        if sampler is not None:
            sampler.set_custom_curriculum_learning_schedule(schedule_func_dict)

    def sparse_attention_config(self) -> dict[str, Any] | None:
        """The ``sparse_attention`` section with DeepSpeed's defaults (None when absent)."""
        return self._data_efficiency.sections["sparse_attention"]

    def sparsity_config(self, num_heads: int) -> Any:
        """The ``SparsityConfig`` the section describes, for a layer of ``num_heads`` heads."""
        section = self.sparse_attention_config()
        if section is None:
            raise ConfigError('sparsity_config: the config has no "sparse_attention" section')
        return ds_data.sparsity_config_from_dict(section, num_heads)
