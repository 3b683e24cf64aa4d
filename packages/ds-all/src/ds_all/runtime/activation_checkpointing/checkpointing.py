"""``deepspeed.runtime.activation_checkpointing.checkpointing`` is ``ds_all.checkpointing``.

DeepSpeed's ``deepspeed.checkpointing`` is this very module, and scripts use both names for the
same process-wide settings (Megatron configures one name and checkpoints through the other), so
both names are bound to one module object here rather than to a copy that would hold its own
settings and RNG tracker.
"""

import sys

from ds_all import checkpointing as _checkpointing

sys.modules[__name__] = _checkpointing
