"""``deepspeed.utils.zero_to_fp32``: whole fp32 weights from a ZeRO checkpoint, offline.

The checkpoint is ds_ckpt's (a manifest and safetensors fragment files, any ZeRO stage and
rank count); the fp32 master weights are read straight from it, so no process group, GPU or
model code is needed. Tied parameters appear under each of their names, as DeepSpeed's tool
restores them. Command line: ``python -m ds_all.utils.zero_to_fp32 CHECKPOINT_DIR OUTPUT_DIR``."""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

import ds_ckpt

# safetensors' dtype names, as the manifest records them
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool}  # fmt: skip
_OUT_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
               "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}  # fmt: skip


class LazyTensor:
    """A checkpoint tensor read on ``.contiguous()`` (``lazy_mode=True``)."""

    def __init__(self, checkpoint_dir: str, tag: str, name: str, shape: list[int]) -> None:
        self.checkpoint_dir: str = checkpoint_dir
        self.tag: str = tag
        self.name: str = name
        self.shape: tuple[int, ...] = tuple(shape)

    def contiguous(self) -> torch.Tensor:
        t = ds_ckpt.load_tensor(self.checkpoint_dir, self.name, self.tag)
        return t.float() if t.is_floating_point() else t


def _engine_state(manifest: ds_ckpt.Manifest) -> dict[str, Any]:
    state = manifest.client_state if isinstance(manifest.client_state, dict) else {}
    engine = state.get("engine")
    return engine if isinstance(engine, dict) else {}


def get_fp32_state_dict_from_zero_checkpoint(
    checkpoint_dir: str | os.PathLike[str],
    tag: str | None = None,
    exclude_frozen_parameters: bool = False,
    lazy_mode: bool = False,
) -> dict[str, Any]:
    """The model's weights from ``checkpoint_dir`` (the folder holding the tag folders and
    ``latest``): trainable parameters from the fp32 masters, frozen ones as saved. ``tag``
    defaults to the latest; ``lazy_mode`` returns objects whose ``.contiguous()`` reads one
    tensor, for models larger than memory."""
    root = os.fspath(checkpoint_dir)
    tag_dir, manifest = ds_ckpt.open_checkpoint(root, tag)
    resolved = os.path.basename(tag_dir)
    engine = _engine_state(manifest)
    frozen = set(engine.get("frozen_params", []))
    names = [
        n for n in manifest.tensors
        if not n.startswith("optimizer.") and not (exclude_frozen_parameters and n in frozen)
    ]  # fmt: skip
    out: dict[str, Any] = OrderedDict()
    if lazy_mode:
        for n in names:
            out[n] = LazyTensor(root, resolved, n, manifest.tensors[n].shape)
    else:
        frags = []
        for n in names:
            rec = manifest.tensors[n]
            if rec.dtype not in _DTYPES:
                raise ValueError(f"zero_to_fp32: tensor {n!r} has dtype {rec.dtype}, which this "
                                 "tool does not convert")  # fmt: skip
            t = torch.empty(rec.shape, dtype=_DTYPES[rec.dtype])
            out[n] = t
            frags.append(ds_ckpt.Fragment.whole(n, t))
        ds_ckpt.load(root, resolved, frags)
        for n in names:  # masters are fp32 already; frozen 16-bit weights are upcast
            if out[n].is_floating_point():
                out[n] = out[n].float()
    for alias, saved in engine.get("shared_params", []):
        if saved in out:
            out[alias] = out[saved]
    return out


def convert_zero_checkpoint_to_fp32_state_dict(
    checkpoint_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    max_shard_size: int | str | None = "5GB",
    safe_serialization: bool = False,
    tag: str | None = None,
    exclude_frozen_parameters: bool = False,
) -> None:
    """Write the fp32 weights to ``output_dir`` as Hugging Face does: ``pytorch_model.bin`` (or
    ``model.safetensors``), split into shards of at most ``max_shard_size`` with an index file."""
    convert_zero_checkpoint_to_state_dict(
        checkpoint_dir, output_dir, torch.float32, max_shard_size, safe_serialization, tag,
        exclude_frozen_parameters,
    )  # fmt: skip


def _shard_bytes(size: int | str | None) -> int | None:
    if size is None or isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", size.upper())
    if m is None:
        raise ValueError(f"max_shard_size {size!r}: use bytes (an int) or a size like '5GB'")
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[m.group(2)]  # fmt: skip
    return int(float(m.group(1)) * scale)


def convert_zero_checkpoint_to_state_dict(
    checkpoint_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    dtype: torch.dtype | str = torch.float32,
    max_shard_size: int | str | None = "5GB",
    safe_serialization: bool = False,
    tag: str | None = None,
    exclude_frozen_parameters: bool = False,
) -> None:
    """``convert_zero_checkpoint_to_fp32_state_dict`` with an output dtype (fp32, fp16, bf16)."""
    if isinstance(dtype, str):
        key = dtype.removeprefix("torch.").lower()
        if key not in _OUT_DTYPES:
            raise ValueError(f"dtype {dtype!r}: use one of {', '.join(sorted(_OUT_DTYPES))}")
        dtype = _OUT_DTYPES[key]
    limit = _shard_bytes(max_shard_size)
    state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag, exclude_frozen_parameters)
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    name = "model.safetensors" if safe_serialization else "pytorch_model.bin"
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    seen: dict[int, int] = {}
    for k, v in state.items():
        nbytes = 0 if id(v) in seen else v.numel() * v.element_size()
        if limit is not None and shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][k] = v
        seen.setdefault(id(v), 0)
        size += nbytes
    os.makedirs(output_dir, exist_ok=True)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        file = name if len(shards) == 1 else name.replace(
            ".", f"-{i + 1:05d}-of-{len(shards):05d}.", 1)  # fmt: skip
        path = os.path.join(output_dir, file)
        if safe_serialization:
            from safetensors.torch import save_file

            # safetensors stores no aliases: each tied name gets its own copy
            save_file({k: v.contiguous().clone() for k, v in shard.items()}, path,
                      metadata={"format": "pt"})  # fmt: skip
        else:
            torch.save(shard, path)
        weight_map.update(dict.fromkeys(shard, file))
    if len(shards) > 1:
        total = sum(
            v.numel() * v.element_size() for v in {id(v): v for v in state.values()}.values()
        )
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        with open(os.path.join(output_dir, name + ".index.json"), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)


def load_state_dict_from_zero_checkpoint(
    model: nn.Module, checkpoint_dir: str | os.PathLike[str], tag: str | None = None
) -> nn.Module:
    """Move ``model`` to the CPU and load the checkpoint's fp32 weights into it (not strict:
    buffers stay as they are); returns the model, no longer usable by its engine."""
    state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag)
    model = model.cpu()
    model.load_state_dict(state, strict=False)
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Consolidate a ZeRO checkpoint into fp32 weights.")
    p.add_argument("checkpoint_dir", help="folder holding the tag folders, e.g. out/checkpoint-12")
    p.add_argument("output_dir", help="where to write pytorch_model.bin / model.safetensors")
    p.add_argument("--max_shard_size", default="5GB")
    p.add_argument("--safe_serialization", action="store_true")
    p.add_argument("-t", "--tag", default=None)
    p.add_argument("--exclude_frozen_parameters", action="store_true")
    a = p.parse_args(argv)
    convert_zero_checkpoint_to_fp32_state_dict(a.checkpoint_dir, a.output_dir, a.max_shard_size,
                                               a.safe_serialization, a.tag,
                                               a.exclude_frozen_parameters)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "convert_zero_checkpoint_to_fp32_state_dict",
    "convert_zero_checkpoint_to_state_dict",
    "get_fp32_state_dict_from_zero_checkpoint",
    "load_state_dict_from_zero_checkpoint",
]
