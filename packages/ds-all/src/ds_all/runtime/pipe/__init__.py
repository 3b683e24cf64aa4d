"""``deepspeed.runtime.pipe``: the pipeline module and topology (ds-pipe's) and the pipeline
engine."""

from ds_all.runtime.pipe import engine, module, topology
from ds_all.runtime.pipe.module import LayerSpec, PipelineModule, TiedLayerSpec
from ds_all.runtime.pipe.topology import ProcessTopology

__all__ = [
    "LayerSpec",
    "PipelineModule",
    "ProcessTopology",
    "TiedLayerSpec",
    "engine",
    "module",
    "topology",
]
