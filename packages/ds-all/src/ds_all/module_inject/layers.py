"""``deepspeed.module_inject.layers``: tensor-parallel layers (ds-tp)."""

from ds_tp import LinearAllreduce, LinearLayer, VocabParallelEmbedding

__all__ = ["LinearAllreduce", "LinearLayer", "VocabParallelEmbedding"]
