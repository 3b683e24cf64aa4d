"""DeepSpeed's config sections for this package, checked and filled with DeepSpeed's defaults.

Plain dicts in, plain dicts out (what DeepSpeed's config parser produced, which is what its
engine and users' code read); a missing, misspelt or invalid key raises ``DataConfigError``
naming the key path. A framework (ds-all) turns these into its own config errors.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from ._curriculum import CurriculumScheduler
from ._errors import DataConfigError
from ._ltd_schedule import RandomLTDScheduler
from .sparse_attention import (
    BigBirdSparsityConfig,
    BSLongformerSparsityConfig,
    DenseSparsityConfig,
    FixedSparsityConfig,
    SparsityConfig,
    VariableSparsityConfig,
)

__all__ = [
    "data_efficiency_config",
    "legacy_curriculum_config",
    "progressive_layer_drop_config",
    "sparse_attention_config",
    "sparsity_config_from_dict",
]

_SCHEDULE_KEYS = {"min_difficulty", "max_difficulty", "schedule_type", "schedule_config"}


def _section(value: Any, path: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise DataConfigError(f"{path}: expected a JSON object, got {value!r}")
    return copy.deepcopy(dict(value))


def _known(section: Mapping[str, Any], allowed: set[str], path: str) -> None:
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise DataConfigError(
            f"{path}: unknown key(s) {', '.join(unknown)}; the keys DeepSpeed reads here are "
            f"{', '.join(sorted(allowed))}"
        )


def _bool(section: Mapping[str, Any], key: str, default: bool, path: str) -> bool:
    value = section.get(key, default)
    if not isinstance(value, bool):
        raise DataConfigError(f"{path}.{key} must be true or false, got {value!r}")
    return value


def _int(section: Mapping[str, Any], key: str, default: int, path: str, minimum: int = 0) -> int:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DataConfigError(f"{path}.{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _schedule(params: dict[str, Any], path: str) -> None:
    try:
        CurriculumScheduler(params)
    except DataConfigError as exc:
        raise DataConfigError(f"{path}: {exc}") from None


# Legacy curriculum learning -----------------------------------------------------------------
def legacy_curriculum_config(section: Any) -> dict[str, Any] | None:
    """The top-level ``curriculum_learning`` section: None when disabled, else its parameters
    (``curriculum_type``, ``min_difficulty``, ``max_difficulty``, ``schedule_type``,
    ``schedule_config``) without ``enabled``."""
    path = "curriculum_learning"
    cfg = _section(section, path)
    _known(cfg, {"enabled", "curriculum_type"} | _SCHEDULE_KEYS, path)
    if not _bool(cfg, "enabled", False, path):
        return None
    cfg.pop("enabled")
    if "curriculum_type" not in cfg:
        raise DataConfigError(
            f"{path} needs 'curriculum_type' (\"seqlen\": the engine passes the difficulty to the "
            f"model's forward as curriculum_seqlen)"
        )
    _schedule(cfg, path)
    return cfg


# Progressive layer drop -----------------------------------------------------------------------
def progressive_layer_drop_config(section: Any) -> dict[str, Any] | None:
    """``progressive_layer_drop``: None when disabled, else ``{"theta", "gamma"}`` with
    DeepSpeed's defaults (1.0 and 0.001)."""
    path = "progressive_layer_drop"
    cfg = _section(section, path)
    _known(cfg, {"enabled", "theta", "gamma"}, path)
    if not _bool(cfg, "enabled", False, path):
        return None
    out = {"theta": cfg.get("theta", 1.0), "gamma": cfg.get("gamma", 0.001)}
    for key, value in out.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataConfigError(f"{path}.{key} must be a number, got {value!r}")
    if not 0.0 <= out["theta"] <= 1.0 or out["gamma"] < 0:
        raise DataConfigError(f"{path}: theta must be in [0, 1] and gamma >= 0, got {out}")
    return out


# Data efficiency --------------------------------------------------------------------------------
_METRIC_KEYS = _SCHEDULE_KEYS | {"difficulty_type", "clustering_type", "index_to_sample_path",
                                 "index_to_metric_path"}  # fmt: skip
_LTD_KEYS = {"enabled", "total_layer_num", "random_ltd_layer_num", "random_ltd_layer_id",
             "model_mask_name", "model_type", "hidden_state_order", "random_ltd_schedule",
             "layer_token_lr_schedule"}  # fmt: skip


def _curriculum_sampling(section: Any, path: str) -> dict[str, Any]:
    cfg = _section(section, path)
    _known(cfg, {"enabled", "data_cluster_path", "curriculum_metrics"}, path)
    out: dict[str, Any] = {"enabled": _bool(cfg, "enabled", False, path)}
    if not out["enabled"]:
        return out
    metrics = cfg.get("curriculum_metrics")
    if not isinstance(metrics, Mapping) or not metrics:
        raise DataConfigError(f"{path} is enabled: 'curriculum_metrics' must name at least one "
                              f"metric with its schedule")  # fmt: skip
    if not isinstance(cfg.get("data_cluster_path"), str):
        raise DataConfigError(f"{path}.data_cluster_path: a directory for the sampler's clusters")
    for name, metric in metrics.items():
        mpath = f"{path}.curriculum_metrics.{name}"
        metric = _section(metric, mpath)
        _known(metric, _METRIC_KEYS, mpath)
        _schedule(metric, mpath)
        if metric.get("difficulty_type") not in ("value", "percentile"):
            raise DataConfigError(f"{mpath}.difficulty_type must be 'value' or 'percentile'")
        clustering = metric.get("clustering_type")
        if clustering not in ("schedule_based", "single_cluster"):
            raise DataConfigError(f"{mpath}.clustering_type must be 'schedule_based' or "
                                  f"'single_cluster', got {clustering!r}")  # fmt: skip
        if clustering == "schedule_based":
            needed = ["index_to_sample_path"]
            needed += ["index_to_metric_path"] if metric["difficulty_type"] == "value" else []
            for key in needed:
                if not isinstance(metric.get(key), str):
                    raise DataConfigError(f"{mpath}.{key}: the DataAnalyzer output prefix "
                                          f"(save_path/<metric>/<metric>_{key[:-5]})")  # fmt: skip
    out.update(cfg)
    return out


def _random_ltd(section: Any, path: str) -> dict[str, Any]:
    cfg = _section(section, path)
    _known(cfg, _LTD_KEYS, path)
    out: dict[str, Any] = {"enabled": _bool(cfg, "enabled", False, path),
                           "layer_token_lr_schedule": {"enabled": False}}  # fmt: skip
    if not out["enabled"]:
        return out
    out.update(cfg)
    for key in ("total_layer_num", "random_ltd_layer_num", "random_ltd_layer_id",
                "model_type", "hidden_state_order", "random_ltd_schedule"):  # fmt: skip
        if key not in cfg:
            raise DataConfigError(f"{path} is enabled and needs '{key}'")
    out.setdefault("model_mask_name", None)
    if out["model_type"] not in ("encoder", "decoder"):
        raise DataConfigError(f"{path}.model_type must be 'encoder' or 'decoder'")
    if out["hidden_state_order"] not in ("batch_seq_dim", "seq_batch_dim"):
        raise DataConfigError(
            f"{path}.hidden_state_order must be 'batch_seq_dim' or 'seq_batch_dim'"
        )
    ids = out["random_ltd_layer_id"]
    if not isinstance(ids, list) or len(ids) != out["random_ltd_layer_num"]:
        raise DataConfigError(f"{path}: random_ltd_layer_id must list random_ltd_layer_num "
                              f"({out['random_ltd_layer_num']}) layer indices, got {ids!r}")  # fmt: skip
    try:
        RandomLTDScheduler({**out, "global_batch_size": 1})
    except DataConfigError as exc:
        raise DataConfigError(f"{path}: {exc}") from None
    return out


def data_efficiency_config(section: Any) -> dict[str, Any]:
    """``data_efficiency`` with DeepSpeed's defaults: ``enabled``, ``seed`` (1234),
    ``data_sampling`` (``enabled``, ``num_epochs`` 1000, ``num_workers`` 0, ``pin_memory``,
    ``curriculum_learning``, ``dynamic_batching``), ``data_routing`` (``enabled``,
    ``random_ltd``). As in DeepSpeed, the curriculum and random-LTD take effect by their own
    ``enabled`` flags."""
    path = "data_efficiency"
    cfg = _section(section, path)
    _known(cfg, {"enabled", "seed", "data_sampling", "data_routing"}, path)
    sampling = _section(cfg.get("data_sampling"), f"{path}.data_sampling")
    spath = f"{path}.data_sampling"
    _known(sampling, {"enabled", "num_epochs", "num_workers", "pin_memory", "curriculum_learning",
                      "dynamic_batching"}, spath)  # fmt: skip
    dynamic = _section(sampling.get("dynamic_batching"), f"{spath}.dynamic_batching")
    if dynamic.get("enabled", False):
        raise DataConfigError(
            f"{spath}.dynamic_batching is not implemented by ds-data; remove the section or set "
            f"its enabled to false"
        )
    routing = _section(cfg.get("data_routing"), f"{path}.data_routing")
    _known(routing, {"enabled", "random_ltd"}, f"{path}.data_routing")
    return {
        "enabled": _bool(cfg, "enabled", False, path),
        "seed": _int(cfg, "seed", 1234, path),
        "data_sampling": {
            "enabled": _bool(sampling, "enabled", False, spath),
            "num_epochs": _int(sampling, "num_epochs", 1000, spath, minimum=1),
            "num_workers": _int(sampling, "num_workers", 0, spath),
            "pin_memory": _bool(sampling, "pin_memory", False, spath),
            "curriculum_learning": _curriculum_sampling(
                sampling.get("curriculum_learning"), f"{spath}.curriculum_learning"
            ),
            "dynamic_batching": {"enabled": False, **dynamic},
        },
        "data_routing": {
            "enabled": _bool(routing, "enabled", False, f"{path}.data_routing"),
            "random_ltd": _random_ltd(routing.get("random_ltd"), f"{path}.data_routing.random_ltd"),
        },
    }


# Sparse attention -------------------------------------------------------------------------------
_SPARSE_DEFAULTS: dict[str, dict[str, Any]] = {
    "dense": {"block": 16},
    "fixed": {"block": 16, "different_layout_per_head": False, "num_local_blocks": 4,
              "num_global_blocks": 1, "attention": "bidirectional",
              "horizontal_global_attention": False, "num_different_global_patterns": 1},
    "variable": {"block": 16, "different_layout_per_head": False, "num_random_blocks": 0,
                 "local_window_blocks": [4], "global_block_indices": [0],
                 "global_block_end_indices": None, "attention": "bidirectional",
                 "horizontal_global_attention": False},
    "bigbird": {"block": 16, "different_layout_per_head": False, "num_random_blocks": 0,
                "num_sliding_window_blocks": 3, "num_global_blocks": 1},
    "bslongformer": {"block": 16, "different_layout_per_head": False,
                     "num_sliding_window_blocks": 3, "global_block_indices": [0],
                     "global_block_end_indices": None},
}  # fmt: skip
_SPARSE_CLASSES: dict[str, type[SparsityConfig]] = {
    "dense": DenseSparsityConfig, "fixed": FixedSparsityConfig, "variable": VariableSparsityConfig,
    "bigbird": BigBirdSparsityConfig, "bslongformer": BSLongformerSparsityConfig,
}  # fmt: skip


def sparse_attention_config(section: Any) -> dict[str, Any] | None:
    """``sparse_attention`` as DeepSpeed parsed it: ``mode`` (default ``fixed``) and that mode's
    parameters with their defaults; None when the section is absent. DeepSpeed reads only these
    keys per mode (``bigbird``'s ``attention`` is not among them: bidirectional)."""
    if section is None:
        return None
    path = "sparse_attention"
    cfg = _section(section, path)
    mode = cfg.get("mode", "fixed")
    if mode not in _SPARSE_DEFAULTS:
        raise DataConfigError(
            f"{path}.mode {mode!r} is not a sparsity mode; use one of {', '.join(_SPARSE_DEFAULTS)}"
        )
    # DeepSpeed ignores other modes' keys in the section; a key no mode reads is a typo.
    every = {"mode"} | {k for d in _SPARSE_DEFAULTS.values() for k in d} | {"attention"}
    _known(cfg, every, path)
    out = {"mode": mode}
    out.update({k: cfg.get(k, default) for k, default in _SPARSE_DEFAULTS[mode].items()})
    sparsity_config_from_dict(out, num_heads=1)  # the layout parameters are checked here
    return out


def sparsity_config_from_dict(config: Mapping[str, Any], num_heads: int) -> SparsityConfig:
    """The ``SparsityConfig`` for a parsed ``sparse_attention`` section and a head count."""
    params = dict(config)
    mode = params.pop("mode", "fixed")
    if mode not in _SPARSE_CLASSES:
        raise DataConfigError(f"sparse_attention.mode {mode!r} is not a sparsity mode")
    try:
        return _SPARSE_CLASSES[mode](num_heads=num_heads, **params)
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise DataConfigError(f"sparse_attention ({mode}): {exc}") from None
