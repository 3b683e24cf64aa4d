"""Checks shared by the optimizers' constructors.

The optimizers take DeepSpeed's parameter names and positional order, which differ from
torch.optim's (DeepSpeed: lr, bias_correction, betas, ...; torch: lr, betas, eps, ...). A
positional call written for the other order must fail with a message, not run with a tuple
taken as a truthy bias_correction or a float taken as betas.
"""

from __future__ import annotations

import numbers


def check_betas(betas: object) -> None:
    if (
        not isinstance(betas, (tuple, list))
        or len(betas) != 2
        or not all(isinstance(b, numbers.Real) and not isinstance(b, bool) for b in betas)
    ):
        raise TypeError(f"invalid betas: {betas!r} (must be a pair of floats, e.g. (0.9, 0.999))")
    for i, b in enumerate(betas):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"invalid betas[{i}]: {b} (must be in [0, 1))")


def check_flags(cls: str, **flags: object) -> None:
    """Each switch must be True/False (0/1 accepted): anything else is a misplaced argument."""
    for name, value in flags.items():
        if not (isinstance(value, int) and value in (0, 1)):  # bool is an int subclass
            raise TypeError(
                f"{cls}: {name} must be True or False, got {value!r} (the positional order is "
                "DeepSpeed's, not torch.optim's; pass hyperparameters by keyword, e.g. "
                "betas=(0.9, 0.999))"
            )
