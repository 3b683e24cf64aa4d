# DeepSpeed API level implemented (public version) + this package's own version (local label).
# Clients gate features on `version.parse(importlib.metadata.version("deepspeed")) >= X`; the
# local label keeps the release of this package visible and is never taken for a real DeepSpeed.
__version__ = "0.19.8+dsall.0.1.3"
