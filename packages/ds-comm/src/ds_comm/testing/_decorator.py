"""``@distributed_test``: a pytest test whose body runs on N spawned ranks."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any

from ds_comm.testing._spawn import DEFAULT_TIMEOUT, _FnRef, run_distributed


def distributed_test(
    world_size: int | Iterable[int] = 2,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    backend: str | None = "gloo",
    env: dict[str, str] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Run the decorated module-level test on ``world_size`` ranks (a list parametrizes).

    The test may take pytest fixtures whose values pickle (``tmp_path``, parameters) and a
    ``world_size`` argument; they are computed once in the pytest process and passed to every
    rank, so ``tmp_path`` is a directory all ranks share. What the body returns is discarded;
    use :func:`run_distributed` directly to collect per-rank results.
    """
    sizes = [world_size] if isinstance(world_size, int) else list(world_size)
    if not sizes or any(not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"distributed_test: world_size must be positive ints, got {world_size!r}")

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        import pytest

        if "." in fn.__qualname__:
            raise TypeError(
                f"distributed_test: {fn.__qualname__} must be a module-level function (not a "
                "method or a nested function) so that spawned ranks can import it"
            )
        sig = inspect.signature(fn)
        wants_world_size = "world_size" in sig.parameters
        ref = _FnRef(fn.__module__, fn.__qualname__)

        @functools.wraps(fn)
        def wrapper(world_size: int, **fixtures: Any) -> None:
            if wants_world_size:
                fixtures["world_size"] = world_size
            run_distributed(
                ref, world_size, kwargs=fixtures, timeout=timeout, backend=backend, env=env
            )

        others = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for name, p in sig.parameters.items()
            if name != "world_size"
        ]
        wrapper.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter("world_size", inspect.Parameter.POSITIONAL_OR_KEYWORD), *others]
        )
        del wrapper.__wrapped__  # pytest must see the new signature, not the body's
        wrapper.__ds_distributed_inner__ = fn  # type: ignore[attr-defined]
        return pytest.mark.parametrize("world_size", sizes)(wrapper)

    return decorate
