"""Sharded, reshardable checkpoints: safetensors fragment files + a JSON manifest, atomic commit.

Each rank saves the fragments (ranges of flattened global tensors) it holds and loads the ranges
it needs, so a checkpoint written at one layout loads at any other. No pickle in the format.
"""

from ds_ckpt._commit import complete_tags, resolve_tag
from ds_ckpt._errors import (
    AsyncSaveError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
)
from ds_ckpt._fragment import Fragment, FragmentLike
from ds_ckpt._jsonstate import capture_rng_state, restore_rng_state
from ds_ckpt._load import load, load_rank_state, load_tensor, open_checkpoint
from ds_ckpt._manifest import FORMAT_VERSION, Manifest
from ds_ckpt._save import SaveHandle, Saver, SaveState, finalize, save, set_default_saver
from ds_ckpt._version import __version__

wait = finalize  # the name DeepSpeed users look for; same operation

__all__ = [
    "AsyncSaveError",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "FORMAT_VERSION",
    "Fragment",
    "FragmentLike",
    "Manifest",
    "SaveHandle",
    "SaveState",
    "Saver",
    "__version__",
    "capture_rng_state",
    "complete_tags",
    "finalize",
    "load",
    "load_rank_state",
    "load_tensor",
    "open_checkpoint",
    "resolve_tag",
    "restore_rng_state",
    "save",
    "set_default_saver",
    "wait",
]
