"""``deepspeed.moe``: mixture-of-experts layers (implemented by ds-moe).

The submodules mirror DeepSpeed's files: ``layer`` (``MoE``), ``experts`` (``Experts``),
``sharded_moe`` (the gating functions), ``utils`` (parameter and optimizer-group helpers)."""

from ds_all.moe import experts, layer, mappings, sharded_moe, utils
from ds_all.moe.layer import MoE

__all__ = ["MoE", "experts", "layer", "mappings", "sharded_moe", "utils"]
