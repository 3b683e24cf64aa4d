"""``deepspeed.ops.op_builder.all_ops``: ``ALL_OPS``, DeepSpeed's op name -> builder, for the
ops ds_kernels (and ds_offload's async IO) implement."""

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

_BUILDERS: tuple[type[OpBuilder], ...] = (
    AsyncIOBuilder, CPUAdagradBuilder, CPUAdamBuilder, CPULionBuilder, FusedAdamBuilder,
    FusedLambBuilder, FusedLionBuilder, QuantizerBuilder,
)  # fmt: skip
ALL_OPS: dict[str, OpBuilder] = {b.NAME: b() for b in _BUILDERS}

__all__ = ["ALL_OPS"]
