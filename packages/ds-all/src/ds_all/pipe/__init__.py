"""``deepspeed.pipe``: pipeline parallelism's user API (ds-pipe's): ``PipelineModule``,
``LayerSpec``, ``TiedLayerSpec``; ``deepspeed.initialize`` runs a ``PipelineModule`` with the
pipeline engine."""

from ds_pipe import LayerSpec, PipelineModule, TiedLayerSpec

__all__ = ["LayerSpec", "PipelineModule", "TiedLayerSpec"]
