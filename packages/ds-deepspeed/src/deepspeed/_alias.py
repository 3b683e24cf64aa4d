"""``deepspeed.X.Y`` is ``ds_all.X.Y``: a meta-path finder that returns ds_all's module objects.

No module is copied: after ``import deepspeed.runtime.zero``, ``sys.modules`` maps
``"deepspeed.runtime.zero"`` to the very module ``ds_all.runtime.zero``, so patches, isinstance
checks and module-level registries are shared between both names."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target: str = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None  # a placeholder the import system discards: exec_module swaps it out

    def exec_module(self, module: types.ModuleType) -> None:
        # The import system returns whatever sys.modules holds for the name once exec_module
        # returns, so the alias name ends up bound to the target module object itself.
        sys.modules[module.__name__] = importlib.import_module(self.target)


class AliasFinder(importlib.abc.MetaPathFinder):
    """Resolves ``<alias>.<rest>`` to ``<target>.<rest>`` for public submodules (a first
    component starting with ``_`` is left to the alias package's own files)."""

    def __init__(self, alias: str, target: str) -> None:
        self.alias: str = alias
        self.target: str = target

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        prefix = self.alias + "."
        if not fullname.startswith(prefix):
            return None
        rest = fullname[len(prefix) :]
        if rest.startswith("_"):
            return None
        real = f"{self.target}.{rest}"
        try:
            spec = importlib.util.find_spec(real)
        except ModuleNotFoundError:
            return None
        if spec is None:
            return None
        return importlib.util.spec_from_loader(
            fullname, _AliasLoader(real), is_package=spec.submodule_search_locations is not None
        )


def install(alias: str, target: str) -> AliasFinder:
    """Put the finder for ``alias`` first on ``sys.meta_path`` (once per alias)."""
    for finder in sys.meta_path:
        if isinstance(finder, AliasFinder) and finder.alias == alias:
            return finder
    finder = AliasFinder(alias, target)
    sys.meta_path.insert(0, finder)
    return finder
