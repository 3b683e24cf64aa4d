"""``checkpoint``: loading the full weights DeepSpeed's AutoTP inference path reads.

A checkpoint description (a dict, or the path of its JSON file) is DeepSpeed's
``{"type": "ds_model" | "bloom", "checkpoints": [files...], "version": 1.0}``; the files
(safetensors, or torch files of plain tensors) are found under the description's
``base_dir`` or else the config's ``base_dir``. The whole model is loaded before it is split
(each rank reads the full weights and keeps its slices), so the split layers hold exactly the
checkpoint's values. A model built on the meta device is given real (host) storage first, its
tied weights tied again, and every meta tensor must then be filled by the checkpoint.

Megatron model-parallel checkpoints and the pre-split ``{"tp": ..., "non_tp": ...}`` files of
DeepSpeed's fused-kernel path are refused.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ds_all._config_base import ConfigError
from ds_all._config_file import read_config_file

_FULL_WEIGHT_TYPES = ("ds_model", "bloom")


def load_checkpoint(model: nn.Module, checkpoint: str | dict[str, Any], base_dir: str) -> None:
    """Fill ``model``'s parameters and persistent buffers from the described files."""
    files = _files(_description(checkpoint), base_dir)
    was_meta = _materialize(model)
    targets = model.state_dict(keep_vars=True)
    prefix = getattr(model, "base_model_prefix", "") or ""
    loaded: set[int] = set()
    unmatched: list[str] = []
    for path in files:
        for key, value in _read(path).items():
            name = key if key in targets else f"{prefix}.{key}" if prefix else key
            target = targets.get(name)
            if target is None:
                unmatched.append(key)
                continue
            if tuple(target.shape) != tuple(value.shape):
                raise ConfigError(
                    f"checkpoint: {key} in {path} has shape {tuple(value.shape)} but the "
                    f"model's {name} has {tuple(target.shape)}; the checkpoint is of another model"
                )
            with torch.no_grad():
                target.copy_(value)
            loaded.add(id(target))
    if not loaded:
        raise ConfigError(
            f"checkpoint: no tensor of {files} is named as a parameter of the model "
            f"(checkpoint keys such as {unmatched[:3]}, model names such as "
            f"{list(targets)[:3]}); give the weight files of this model"
        )
    if unmatched:
        warnings.warn(
            f"checkpoint: {len(unmatched)} tensors match no parameter of the model and were "
            f"skipped, e.g. {unmatched[:3]}",
            UserWarning,
            stacklevel=3,
        )
    missing = [n for n, t in targets.items() if n in was_meta and id(t) not in loaded]
    if missing:
        raise ConfigError(
            f"checkpoint: the model was built on the meta device and the checkpoint does not "
            f"hold {missing[:5]}{' ...' if len(missing) > 5 else ''}; list every weight file "
            "in checkpoint.checkpoints"
        )


def _description(checkpoint: str | dict[str, Any]) -> dict[str, Any]:
    desc = read_config_file(Path(checkpoint)) if isinstance(checkpoint, str) else checkpoint
    kind = desc.get("type")
    files = desc.get("checkpoints")
    if not isinstance(kind, str) or files is None:
        raise ConfigError(
            'checkpoint: expected {"type": "ds_model", "checkpoints": [weight files], '
            f'"version": 1.0}} (a dict or the path of its JSON file), got keys {sorted(desc)}'
        )
    if kind.lower() not in _FULL_WEIGHT_TYPES:
        raise ConfigError(
            f"checkpoint: type {kind!r} is not supported; the full-weight types "
            f"{list(_FULL_WEIGHT_TYPES)} are (Megatron model-parallel checkpoints are not)"
        )
    if isinstance(files, dict) or desc.get("parallelization") == "tp":
        raise ConfigError(
            "checkpoint: a checkpoint split for DeepSpeed's fused kernels ('tp'/'non_tp' files) "
            "is not supported; list the model's full weight files in checkpoints"
        )
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files) or not files:
        raise ConfigError(f"checkpoint.checkpoints: expected a list of file names, got {files!r}")
    return desc


def _files(desc: dict[str, Any], base_dir: str) -> list[str]:
    root = desc.get("base_dir") or base_dir
    paths = [os.path.join(root, f) if root else f for f in desc["checkpoints"]]
    for p in paths:
        if not os.path.isfile(p):
            raise ConfigError(
                f"checkpoint: weight file {p!r} does not exist; check checkpoint.checkpoints and "
                "base_dir"
            )
    return paths


def _read(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure gets the same advice
        raise ConfigError(
            f"checkpoint: {path} cannot be loaded as plain tensors ({type(e).__name__}: {e}); "
            "give safetensors files or torch files holding a dict of tensors"
        ) from None
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ConfigError(f"checkpoint: {path} does not hold a dict of named tensors")
    return data


def _materialize(model: nn.Module) -> set[str]:
    """Give meta tensors host storage (contents undefined until loaded), keeping parameters
    that several modules share shared. Returns the state-dict names that were on meta."""
    state = model.state_dict(keep_vars=True)
    was_meta = {n for n, t in state.items() if t.is_meta}
    persistent = {id(t) for t in state.values()}
    lost = [
        n for n, b in model.named_buffers() if b.is_meta and id(b) not in persistent
    ]  # not in any checkpoint, so nothing could fill them
    if lost:
        raise ConfigError(
            f"checkpoint: the model's non-persistent buffers {lost[:3]} are on the meta device "
            "and no checkpoint holds them; build the model with only its parameters on meta "
            "(transformers: init_empty_weights(include_buffers=False))"
        )
    if not was_meta:
        return was_meta
    slots = [(m, n, p) for m in model.modules() for n, p in m._parameters.items() if p is not None]
    owner: dict[int, tuple[nn.Module, str]] = {}
    for m, n, p in slots:
        owner.setdefault(id(p), (m, n))
    model.to_empty(device="cpu")
    for m, n, p in slots:
        first_module, first_name = owner[id(p)]
        if first_module is not m or first_name != n:
            m._parameters[n] = first_module._parameters[first_name]
    return was_meta
