"""The one error type of ds-data's configuration checks."""

from __future__ import annotations

__all__ = ["DataConfigError"]


class DataConfigError(ValueError):
    """A data-efficiency, curriculum, layer-drop or sparsity setting is missing or invalid.

    A ``ValueError`` so callers that caught DeepSpeed's assertion-style failures as value errors
    keep working; the message names the key and how to fix it.
    """
