"""Exceptions raised by ds_ckpt; every message names the file/tensor at fault and the fix."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """Base class: a checkpoint could not be written, found or read."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No complete checkpoint exists where one was asked for."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint file has the wrong size, a bad hash, or a malformed header/manifest."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint does not hold what the caller wants (missing name, other shape/dtype)."""


class AsyncSaveError(CheckpointError):
    """A background writer failed on at least one rank; raised on every rank."""
