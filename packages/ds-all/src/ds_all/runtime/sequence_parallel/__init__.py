"""``deepspeed.runtime.sequence_parallel``: Arctic Long Sequence Training pieces (ds-seq's)."""
