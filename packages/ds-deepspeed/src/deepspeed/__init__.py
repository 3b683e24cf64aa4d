"""DeepSpeed's import name over ds-all: ``import deepspeed`` runs ds_all's engine.

``deepspeed.initialize``, ``deepspeed.zero``, ``deepspeed.comm``, ... are ds_all's objects, and
every public submodule ``deepspeed.X.Y`` is the module ``ds_all.X.Y`` itself (a meta-path alias,
no copies). Importing refuses to run next to a real DeepSpeed (see ``_guard``)."""

from pathlib import Path

from deepspeed import _guard, _version

_guard.check(Path(__file__).parent)

from deepspeed import _alias  # noqa: E402

_alias.install("deepspeed", "ds_all")

import ds_all  # noqa: E402

# DeepSpeed's eager submodules: `import deepspeed` then deepspeed.comm.*, deepspeed.zero.*, ...
from deepspeed import (  # noqa: E402,F401
    accelerator,
    checkpointing,
    comm,
    ops,
    runtime,
    utils,
    zero,
)
from ds_all import *  # noqa: E402,F403

# after the star import, which brought ds_all's own __version__
__version__: str = _version.__version__
_api = [int(x) for x in __version__.partition("+")[0].split(".")[:3]]
__version_major__: int = _api[0]
__version_minor__: int = _api[1]
__version_patch__: int = _api[2]
__git_hash__: str = "ds-all"
__git_branch__: str = "ds-all"


def __getattr__(name: str) -> object:
    # names ds_all adds later (or that DeepSpeed users reach by attribute) resolve to ds_all's
    return getattr(ds_all, name)


__all__ = sorted({*ds_all.__all__, "__version__"})
