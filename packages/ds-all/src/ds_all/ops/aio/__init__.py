"""``deepspeed.ops.aio``: ``AsyncIOBuilder``; ``AsyncIOBuilder().load().aio_handle(...)`` is
DeepSpeed's async IO handle over ds_offload's engine."""

from ds_all.ops.op_builder import AsyncIOBuilder

__all__ = ["AsyncIOBuilder"]
