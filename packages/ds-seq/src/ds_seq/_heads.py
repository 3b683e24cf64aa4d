"""Which heads each rank of a sequence-parallel group attends over.

DeepSpeed 0.19.8's rule, kept so that a model sharded here matches one sharded there:

* the KV head count decides. When it divides the group, every tensor's heads are split evenly
  (the query head count must then divide the group too);
* when it does not, whole KV groups (one KV head and its ``H / KV`` query heads) are dealt out,
  the first ``KV % p`` ranks taking one group more; a query head therefore always lands on the
  rank holding its KV head. Fewer KV heads than ranks is refused: a rank would hold no head.
"""

from __future__ import annotations


def head_splits(num_heads: int, world: int, num_kv_heads: int | None = None) -> list[int]:
    """Heads of a tensor with ``num_heads`` heads that each of ``world`` ranks gets.

    ``num_kv_heads``: the model's KV head count (the partition follows KV groups); None treats
    the tensor as multi-head attention (``num_kv_heads = num_heads``).
    """
    if world < 1:
        raise ValueError(f"sequence parallel size must be >= 1, got {world}")
    kv = num_heads if num_kv_heads is None else num_kv_heads
    if kv < world:
        raise ValueError(
            f"Number of key-value heads ({kv}) must be at least the sequence parallel size "
            f"({world}); a smaller count leaves a rank with no head to attend over. Use a "
            f"sequence parallel size <= {kv}"
        )
    if kv % world == 0:
        if num_heads % world != 0:
            raise ValueError(
                f"Number of heads ({num_heads}) must be divisible by the sequence parallel size "
                f"({world}) when the {kv} key-value heads divide it evenly"
            )
        return [num_heads // world] * world
    groups = [kv // world + (1 if r < kv % world else 0) for r in range(world)]
    if num_heads % kv == 0:
        per_group = num_heads // kv
        return [g * per_group for g in groups]
    # a head count unrelated to the KV groups: near-even, the first ranks one head more
    return [num_heads // world + (1 if r < num_heads % world else 0) for r in range(world)]
