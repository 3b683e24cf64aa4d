"""``deepspeed.compression``: what DeepSpeed 0.19.8 keeps of its removed compression library,
the ``helper`` module's ``recursive_getattr`` / ``recursive_setattr`` (now in
``deepspeed.utils.module_utils``). The compression config section (``compression_training``)
is refused by the config, as DeepSpeed refuses it."""

__all__: list[str] = []
