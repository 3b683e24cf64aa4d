"""``deepspeed.runtime.zero.leaf_module_config``: the ``zero_optimization.leaf_module`` section
(ds_zero's model, which owns it) and DeepSpeed's defaults: Hugging Face's sparse MoE blocks are
ZeRO-3 leaves unless the section says otherwise. ``initialize()`` flags the modules it names
before wrapping the model (``deepspeed.utils.z3_leaf_module.apply_zero_leaf_module_config``).
"""

from ds_zero import DEFAULT_LEAF_MODULE_CLASSES as _CLASSES
from ds_zero import LeafModuleConfig as DeepSpeedZeroLeafModuleConfig

# lists, as DeepSpeed's are (copies: ds_zero's tuple stays the one source)
DEFAULT_LEAF_MODULE_CLASSES: list[str] = list(_CLASSES)
DEFAULT_LEAF_MODULE_NAMES: list[str] = []
DEFAULT_LEAF_MODULE_NAME_SUFFIXES: list[str] = []

__all__ = [
    "DEFAULT_LEAF_MODULE_CLASSES",
    "DEFAULT_LEAF_MODULE_NAMES",
    "DEFAULT_LEAF_MODULE_NAME_SUFFIXES",
    "DeepSpeedZeroLeafModuleConfig",
]
