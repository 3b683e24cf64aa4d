"""``deepspeed.ops.op_builder``: the builders clients probe ops with
(``CPUAdamBuilder().is_compatible()``, ``AsyncIOBuilder().load()``), over ds_kernels' op
registry; see ``builder`` for what ``load()`` returns. Builders of DeepSpeed ops that no ds-*
package implements (inference, transformer, sparse attention, ...) are not defined here."""

from ds_all.ops.op_builder.builder import (
    AsyncIOBuilder,
    CPUAdagradBuilder,
    CPUAdamBuilder,
    CPULionBuilder,
    FusedAdamBuilder,
    FusedLambBuilder,
    FusedLionBuilder,
    OpBuilder,
    QuantizerBuilder,
)

__all__ = [
    "AsyncIOBuilder",
    "CPUAdagradBuilder",
    "CPUAdamBuilder",
    "CPULionBuilder",
    "FusedAdamBuilder",
    "FusedLambBuilder",
    "FusedLionBuilder",
    "OpBuilder",
    "QuantizerBuilder",
]
