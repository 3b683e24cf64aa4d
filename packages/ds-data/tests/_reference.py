"""DeepSpeed's recorded values (tests/make_reference.py) and, where installed, its classes."""

from __future__ import annotations

import importlib
import json
from functools import cache
from pathlib import Path

import pytest

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "deepspeed_reference.json"


@cache
def reference() -> dict:
    return json.loads(FIXTURE.read_text())


def real_deepspeed(module: str, name: str, ours: object):
    """DeepSpeed's ``module.name`` when a real DeepSpeed provides it, else skip the test.

    Our own ``deepspeed`` alias (ds-deepspeed) re-exports ds-data's classes, so a class that is
    ours, or defined outside ``deepspeed.``, is not a reference.
    """
    try:
        found = getattr(importlib.import_module(module), name)
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available here"
        pytest.skip(f"{module}.{name} not importable: {type(exc).__name__}: {exc}")
    if found is ours or not found.__module__.startswith("deepspeed."):
        pytest.skip(f"{module}.{name} is not DeepSpeed's own class")
    return found
