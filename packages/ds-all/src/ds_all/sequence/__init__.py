"""``deepspeed.sequence``: DeepSpeed-Ulysses sequence parallelism (implemented by ds-seq)."""
