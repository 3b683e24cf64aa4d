"""Import a DeepSpeed ZeRO stage 1/2/3 checkpoint into this format, without running its pickles.

DeepSpeed's `.pt` files are pickles. They are read with `torch.load(weights_only=True)`, which
only rebuilds tensors and plain containers, plus an explicit allowlist of the three DeepSpeed
classes these files name (`ZeroStageEnum`, `LossScaler`, `fragment_address`). Each is mapped to
an inert stand-in defined here that only records its arguments/state: no DeepSpeed code runs,
DeepSpeed need not be installed, and any other global (os.system, ...) is refused.

DeepSpeed's partitioning, reproduced from its zero_to_fp32 reconstruction:
- stage 1/2: per param group, one flat fp32 buffer (params in `param_shapes` order, each followed
  by its alignment padding) split into equal contiguous partitions, one per rank
  (`single_partition_of_fp32_groups`); Adam moments share that layout.
- stage 3: every param is split on its own into ceil(numel/world) elements per rank; a rank's
  flat group concatenates its pieces of the group's params (`fp32_flat_groups`).
Those ranges become fragments, written by ds_ckpt.save (mmap'd reads: memory stays bounded).
"""

from __future__ import annotations

import glob
import math
import os
import re
import warnings
from collections import OrderedDict
from typing import Any

import torch

from ds_ckpt._errors import CheckpointCorruptError, CheckpointError
from ds_ckpt._fragment import Fragment
from ds_ckpt._jsonstate import encode


class _DSObject:
    """Inert stand-in for an allowlisted DeepSpeed class: keeps arguments and state only."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _ZeroStageEnum(_DSObject):
    """deepspeed.runtime.zero.config.ZeroStageEnum(value): pickled as a call with the value."""


class _LossScaler(_DSObject):
    pass


class _FragmentAddress(_DSObject):
    pass


ALLOWLIST: list[tuple[type, str]] = [
    (_ZeroStageEnum, "deepspeed.runtime.zero.config.ZeroStageEnum"),
    (_LossScaler, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (_LossScaler, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
    (_FragmentAddress, "deepspeed.utils.tensor_fragment.fragment_address"),
]

# Keys of DeepSpeed's model-states file that are its own; the rest is the user's client_state.
_DS_MODEL_KEYS = {
    "module",
    "buffer_names",
    "optimizer",
    "param_shapes",
    "frozen_param_shapes",
    "shared_params",
    "frozen_param_fragments",
    "lr_scheduler",
    "data_sampler",
    "random_ltd",
    "sparse_tensor_module_names",
    "skipped_steps",
    "global_steps",
    "global_samples",
    "dp_world_size",
    "mp_world_size",
    "ds_config",
    "ds_version",
    "checkpoint_parallel_dimensions",
}


def safe_torch_load(path: str) -> Any:
    """torch.load with weights_only=True and the DeepSpeed allowlist; never unpickles anything
    else. Errors name the file and the refused global."""
    try:
        with torch.serialization.safe_globals(ALLOWLIST):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except Exception as e:  # UnpicklingError for a refused global; RuntimeError for garbage
        raise CheckpointCorruptError(
            f"{path}: refused to load ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
            "only tensors, plain containers and DeepSpeed's ZeroStageEnum/LossScaler/"
            "fragment_address are allowed, nothing is ever unpickled with weights_only=False"
        ) from None


def _rank_of(path: str) -> int:
    m = re.search(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_", os.path.basename(path))
    if m is None:
        raise CheckpointError(f"{path}: not a DeepSpeed ZeRO file name")
    if int(m.group(2)) != 0:
        raise CheckpointError(
            f"{path}: tensor/model-parallel DeepSpeed checkpoints (mp_rank > 0) are not "
            "supported by import-deepspeed; convert with DeepSpeed's ds_to_universal first"
        )
    return int(m.group(1))


def find_tag_dir(ds_dir: str, tag: str | None) -> str:
    """DS_DIR may be the root holding `latest`, or a tag directory itself."""
    if tag is not None:
        d = os.path.join(ds_dir, tag)
    elif glob.glob(os.path.join(ds_dir, "*optim_states.pt")):
        d = ds_dir
    else:
        latest = os.path.join(ds_dir, "latest")
        try:
            with open(latest) as f:
                d = os.path.join(ds_dir, f.read().strip())
        except FileNotFoundError:
            raise CheckpointError(
                f"{ds_dir}: no *optim_states.pt files and no 'latest' file; pass the DeepSpeed "
                "checkpoint directory (or a tag directory) and --tag"
            ) from None
    if not os.path.isdir(d):
        raise CheckpointError(f"{d}: DeepSpeed checkpoint tag directory not found")
    return d


def _shape(s: Any) -> tuple[int, ...]:
    return tuple(int(x) for x in s)


def _stage(osd: dict) -> int:
    z = osd.get("zero_stage")
    if isinstance(z, _DSObject):
        return int(z.args[0])
    if isinstance(z, int):
        return z
    if "single_partition_of_fp32_groups" in osd:  # BF16_Optimizer (stage 1 with bf16)
        return 1
    raise CheckpointError("cannot tell the ZeRO stage of the optimizer states")


def _flat_partition_frags(
    groups: list[OrderedDict],
    paddings: list | None,
    parts: list,
    plen: list[int],
    rank: int,
    prefix: str,
) -> list[Fragment]:
    """Stage 1/2: rank `rank` holds [rank*L, rank*L + len(part)) of each group's flat buffer,
    L being the padded partition length (the last rank's fp32 part is saved unpadded)."""
    out = []
    for g, shapes in enumerate(groups):
        part = parts[g]
        lo_r, hi_r = rank * plen[g], rank * plen[g] + part.numel()
        pos = 0
        for i, (name, shape) in enumerate(shapes.items()):
            shape = _shape(shape)
            k = math.prod(shape)
            lo, hi = max(lo_r, pos), min(hi_r, pos + k)
            if lo < hi:
                out.append(
                    Fragment(
                        prefix + name,
                        shape,
                        part.dtype,
                        lo - pos,
                        hi - lo,
                        part[lo - lo_r : hi - lo_r],
                    )
                )
            pos += k + (int(paddings[g][i]) if paddings else 0)
    return out


def _stage3_frags(
    groups: list[OrderedDict], parts: list, rank: int, world: int, prefix: str
) -> list[Fragment]:
    """Stage 3: each param split alone, ceil(numel/world) per rank, padded on the last rank."""
    out = []
    for g, shapes in enumerate(groups):
        part = parts[g]
        pos = 0
        for name, shape in shapes.items():
            shape = _shape(shape)
            k = math.prod(shape)
            pn = math.ceil(k / world)
            lo, hi = min(k, rank * pn), min(k, (rank + 1) * pn)
            if lo < hi:
                out.append(
                    Fragment(
                        prefix + name, shape, part.dtype, lo, hi - lo, part[pos : pos + hi - lo]
                    )
                )
            pos += pn
        if pos != part.numel():
            raise CheckpointCorruptError(
                f"stage 3 group {g} of rank {rank}: params take {pos} elements, the flat "
                f"group has {part.numel()}; the checkpoint does not match its param_shapes"
            )
    return out


def _json_or_skip(key: str, value: Any) -> Any:
    try:
        return encode(value, key)
    except (TypeError, ValueError) as e:
        warnings.warn(f"import-deepspeed: {key} not imported ({e})", RuntimeWarning, stacklevel=3)
        return None


def import_deepspeed(
    ds_dir: str, out_dir: str, *, tag: str | None = None, out_tag: str | None = None
) -> str:
    """Convert DeepSpeed checkpoint `ds_dir` (ZeRO 1/2/3, no tensor/pipeline parallelism) into
    a ds-ckpt checkpoint under `out_dir`. Returns the tag written.

    Written: fp32 master weights under the parameter names (what zero_to_fp32 produces),
    `optimizer.<key>.<name>` for each Adam-style state (exp_avg, exp_avg_sq, step, ...),
    buffers and frozen params from the model file, and client_state {"deepspeed": {...}} with
    global_steps, lr_scheduler, optimizer hyperparameters, ds_config, plus the user's keys.
    """
    from ds_ckpt._save import Saver

    tdir = find_tag_dir(ds_dir, tag)
    optim_files = sorted(
        glob.glob(os.path.join(tdir, "*zero_pp_rank_*_mp_rank_*_optim_states.pt")), key=_rank_of
    )
    if not optim_files:
        raise CheckpointError(
            f"{tdir}: no *zero_pp_rank_*_optim_states.pt files; not a ZeRO "
            "checkpoint (stage 0 checkpoints hold a plain state dict)"
        )
    world = len(optim_files)
    if [_rank_of(f) for f in optim_files] != list(range(world)):
        raise CheckpointError(
            f"{tdir}: optimizer state files of some ranks are missing "
            f"(found ranks {[_rank_of(f) for f in optim_files]})"
        )
    model_file = glob.glob(os.path.join(tdir, "mp_rank_00_model_states.pt")) or glob.glob(
        os.path.join(tdir, "zero_pp_rank_0_mp_rank_00_model_states.pt")
    )
    if not model_file:
        raise CheckpointError(
            f"{tdir}: no mp_rank_00_model_states.pt or zero_pp_rank_0_mp_rank_00_model_states.pt"
        )
    model = safe_torch_load(model_file[0])
    groups = model["param_shapes"]
    if isinstance(groups, dict):
        groups = [groups]
    frags: list[Fragment] = []
    hyper: list[dict] = []
    stage = None
    keep_alive = [model]
    for rank, path in enumerate(optim_files):
        sd = safe_torch_load(path)
        keep_alive.append(sd)
        osd = sd["optimizer_state_dict"]
        stage = _stage(osd)
        if stage <= 2:
            parts = osd["single_partition_of_fp32_groups"]
            inner = osd["base_optimizer_state"]
            paddings = osd.get("param_alignment_paddings")
            counts = osd.get("partition_count", world)
            counts = counts if isinstance(counts, list) else [counts] * len(groups)
            if any(int(c) != world for c in counts):
                raise CheckpointError(
                    f"{path}: partition_count {counts} differs from the "
                    f"{world} rank files (expert-parallel groups are not "
                    "supported)"
                )

            pads = osd.get("group_paddings") or [0] * len(groups)
            plen = [parts[g].numel() + int(pads[g]) for g in range(len(groups))]

            def split(ts, prefix, rank=rank, paddings=paddings, plen=plen):
                return _flat_partition_frags(groups, paddings, ts, plen, rank, prefix)
        else:
            parts = osd["fp32_flat_groups"]
            inner = osd["optimizer_state_dict"]
            plen = [p.numel() for p in parts]

            def split(ts, prefix, rank=rank):
                return _stage3_frags(groups, ts, rank, world, prefix)

        frags += split(parts, "")
        states = inner["state"]
        for key in sorted({k for s in states.values() for k in s}):
            per_group = [states[g][key] for g in range(len(groups))]
            if all(
                t.numel() in (parts[g].numel(), plen[g]) and t.numel() > 1
                for g, t in enumerate(per_group)
            ):
                frags += split(per_group, f"optimizer.{key}.")
            elif rank == 0:  # a per-group scalar such as Adam's step: one per parameter
                for g, shapes in enumerate(groups):
                    v = per_group[g].detach().reshape(())
                    for name in shapes:
                        frags.append(
                            Fragment(f"optimizer.{key}.{name}", (), v.dtype, 0, 1, v.reshape(1))
                        )
        if rank == 0:
            hyper = [
                {k: v for k, v in pg.items() if k != "params"}
                for pg in inner.get("param_groups", [])
            ]
    frags += _model_extras(model, stage, groups, world, tdir)
    shared = dict(model.get("shared_params") or {})
    for alias, src in shared.items():
        # A tied weight is stored under its alias too, so either name loads.
        if not any(f.name == alias for f in frags):
            frags += [
                Fragment(alias, f.global_shape, f.dtype, f.offset, f.numel, f.tensor)
                for f in frags
                if f.name == src
            ]
    ds_info = {
        k: model.get(k)
        for k in ("global_steps", "global_samples", "skipped_steps", "dp_world_size", "ds_version")
    }
    ds_info.update(zero_stage=stage, source=os.path.abspath(tdir))
    ds_info["ds_config"] = _json_or_skip("ds_config", model.get("ds_config"))
    ds_info["lr_scheduler"] = _json_or_skip("lr_scheduler", model.get("lr_scheduler"))
    ds_info["param_groups"] = _json_or_skip("param_groups", hyper)
    ds_info["shared_params"] = shared
    client: dict[str, Any] = {"deepspeed": ds_info}
    for k, v in model.items():
        if k not in _DS_MODEL_KEYS:
            client[k] = _json_or_skip(k, v)
    out_tag = out_tag or os.path.basename(os.path.normpath(tdir))
    saver = Saver()  # private: an import must not interact with a training job's pending save
    try:
        saver.save(out_dir, out_tag, frags, client)
    finally:
        saver.close()
    del keep_alive
    return out_tag


def _model_extras(
    model: dict, stage: int | None, groups: list, world: int, tdir: str
) -> list[Fragment]:
    """Buffers and frozen params, which live in the model-states files."""
    out: list[Fragment] = []
    module = model.get("module") or {}
    trainable = {n for g in groups for n in g}
    for name in model.get("buffer_names") or []:
        if name in module and name not in trainable:
            out.append(
                Fragment.whole(
                    name, module[name].float() if module[name].is_floating_point() else module[name]
                )
            )
    frozen = model.get("frozen_param_shapes") or {}
    if frozen and stage == 3:
        per_rank = [
            safe_torch_load(os.path.join(tdir, f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"))[
                "frozen_param_fragments"
            ]
            for r in range(world)
        ]
        for name, shape in frozen.items():
            shape = _shape(shape)
            flat = torch.cat([p[name].reshape(-1) for p in per_rank])[: math.prod(shape)]
            out.append(Fragment.whole(name, flat.reshape(shape)))
    elif stage is not None and stage <= 2:
        # Stage 1/2 keep whole weights in `module`; what is neither trained nor a buffer is
        # frozen (frozen_param_shapes is often None there).
        buffers = set(model.get("buffer_names") or [])
        for name, t in module.items():
            if name not in trainable and name not in buffers:
                out.append(Fragment.whole(name, t))
    return out
