"""``deepspeed.runtime.pipe.module``: ``PipelineModule``, ``LayerSpec``, ``TiedLayerSpec``
(ds-pipe's)."""

from ds_pipe import LayerSpec, PipelineModule, TiedLayerSpec

__all__ = ["LayerSpec", "PipelineModule", "TiedLayerSpec"]
