"""Ulysses sequence parallelism inside Hugging Face transformers models.

``UlyssesSPAttentionHF.register_with_transformers(...)`` replaces the entry of the chosen core
attention (``sdpa``, ``flash_attention_2``, ``flex_attention``, ...) in transformers'
``ALL_ATTENTION_FUNCTIONS`` with a wrapper that exchanges the sequence shard for a head shard,
calls the original function over the whole sequence, and exchanges back. The model keeps its
``attn_implementation``, so every branch transformers takes for that implementation still runs.
transformers is imported only here, when this is used.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ds_seq._exchange import seq_exchange
from ds_seq._groups import SequenceParallelGroups, build_sequence_parallel_groups

log = logging.getLogger("ds_seq")

_MIN_TRANSFORMERS = "4.51.3"


#: a hub-hosted attention kernel's name: "org/repo", optionally "@revision" and ":function"
_HUB_KERNEL = re.compile(r"^[^/:]+/[^/:]+(?:@[^/:]+)?(?::[^/:]+)?$")


def _is_hub_kernel(name: Any) -> bool:
    return isinstance(name, str) and _HUB_KERNEL.match(name) is not None


class UlyssesSPAttentionHF(nn.Module):
    """Sequence-parallel wrapper of a transformers attention function (DeepSpeed's class and
    arguments). Inputs are transformers' ``[bs, heads, seq_local, head_size]``; output is
    ``([bs, seq_local, heads * head_size], attn_weights)``.

    KV heads: when the group is larger than the KV head count (and a multiple of it), each KV
    head is replicated ``sp / kv`` times so that every rank holds one, and the module's
    ``num_key_value_groups`` is set to match, as DeepSpeed does.
    """

    def __init__(
        self,
        attn: Any,
        batch_size: int,
        attn_head_count: int,
        attn_head_size: int,
        kv_head_count: int,
        num_hidden_layers: int,
        process_group: Any,
        seq_length_is_variable: bool = False,
        local_seq_length: int | None = None,
        global_seq_length: int | None = None,
        disable_in_eval: bool = False,
    ) -> None:
        super().__init__()
        self.attn = attn
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.sp_rank = dist.get_rank(process_group)
        self.batch_size = batch_size
        self.seq_length_is_variable = seq_length_is_variable
        self.local_seq_length = local_seq_length
        self.global_seq_length = global_seq_length
        self.disable_in_eval = disable_in_eval
        self.attn_head_size = attn_head_size
        self.attn_head_count = attn_head_count
        self.global_kv_head_count = kv_head_count
        self.num_hidden_layers = num_hidden_layers
        self.core_attn_implementation: str | None = None
        #: flex_attention: the causal BlockMask of the gathered sequence, per (bs, seq, device)
        self._flex_mask_key: tuple[int, int, str] | None = None
        self._flex_mask: Any = None
        if attn_head_count % self.world_size != 0:
            raise ValueError(
                f"Attention head count {attn_head_count} is not divisible by SP size {self.world_size}"
            )
        if not (kv_head_count % self.world_size == 0 or self.world_size % kv_head_count == 0):
            raise ValueError(f"KV attention head count {kv_head_count} is not divisible by SP size "
                             f"{self.world_size} or vice versa")  # fmt: skip
        if not seq_length_is_variable and (local_seq_length is None or global_seq_length is None):
            raise ValueError("UlyssesSPAttentionHF: a fixed sequence length (seq_length_is_variable=False) "
                             "needs local_seq_length and global_seq_length")  # fmt: skip
        self.local_q_head_count = attn_head_count // self.world_size
        self.kv_replication_factor = max(1, self.world_size // kv_head_count)
        self.local_kv_head_count = max(1, kv_head_count // self.world_size)

    def _check_shapes(self, query: Tensor, key: Tensor, value: Tensor) -> None:
        bs, _, sl, hs = query.shape
        want_q = (self.batch_size, self.attn_head_count, sl, self.attn_head_size)
        want_kv = (self.batch_size, self.global_kv_head_count, sl, self.attn_head_size)
        if not self.seq_length_is_variable and sl != self.local_seq_length:
            raise ValueError(f"[rank {self.sp_rank}] local sequence length {sl} differs from the fixed "
                             f"local_seq_length {self.local_seq_length}; pass seq_length_is_variable=True")  # fmt: skip
        if tuple(query.shape) != want_q:
            raise ValueError(f"query shape {tuple(query.shape)} is not the required {want_q} "
                             "[bs, heads, local seqlen, head size]; check micro_batch_size")  # fmt: skip
        if tuple(key.shape) != want_kv or tuple(value.shape) != want_kv:
            raise ValueError(f"key/value shapes {tuple(key.shape)}/{tuple(value.shape)} are not the required "
                             f"{want_kv}")  # fmt: skip

    def forward(
        self,
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Any,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[Tensor, Any]:
        if self.disable_in_eval and not module.training:
            return self.attn(module, query, key, value, attention_mask, *args, **kwargs)
        self._check_shapes(query, key, value)
        if "position_ids" not in kwargs or kwargs["position_ids"] is None:
            raise ValueError(
                "Ulysses SP requires position_ids in every forward() call: each rank's shard "
                "must carry its global positions so that the gathered sequence is causal. Put "
                "position_ids = torch.arange(seq_len) per sample (reset at document boundaries "
                "for packed sequences) into the batch; UlyssesSPDataLoaderAdapter requires them"
            )
        ws = self.world_size
        sl_local = query.shape[2]
        pos = kwargs["position_ids"].contiguous()
        parts = [torch.empty_like(pos) for _ in range(ws)]
        dist.all_gather(parts, pos, group=self.process_group)
        kwargs["position_ids"] = torch.cat(parts, dim=-1)
        if self.kv_replication_factor > 1:
            key = key.repeat_interleave(self.kv_replication_factor, dim=1)
            value = value.repeat_interleave(self.kv_replication_factor, dim=1)

        def to_heads(t: Tensor) -> Tensor:
            # [bs, hc, sl_l, hs]: scatter heads (dim 1), gather sequence (dim 2)
            hc = t.shape[1]
            return seq_exchange(t, 1, 2, [hc // ws] * ws, [sl_local] * ws, self.process_group)

        q, k, v = to_heads(query), to_heads(key), to_heads(value)
        if self.kv_replication_factor > 1:
            module.num_key_value_groups = q.shape[1] // k.shape[1]  # type: ignore[assignment]
        if self.core_attn_implementation == "flex_attention" and attention_mask is not None:
            # the model's BlockMask was built for the local shard's length; attention runs over
            # the gathered sequence, so it gets a causal BlockMask of that length (DeepSpeed
            # does the same: a model's other mask patterns are not carried over)
            attention_mask = self._causal_block_mask(q.shape[0], q.shape[2], q.device)
        context, weights = self.attn(module, q, k, v, attention_mask, *args, **kwargs)
        # context: [bs, sl, hc_l, hs] -> scatter sequence (dim 1), gather heads (dim 2)
        out = seq_exchange(
            context, 1, 2, [sl_local] * ws, [self.local_q_head_count] * ws, self.process_group
        )
        return out.reshape(out.shape[0], out.shape[1], -1), weights

    def _causal_block_mask(self, batch: int, seq: int, device: torch.device) -> Any:
        """A causal flex_attention BlockMask over ``seq`` tokens, built once per shape (every
        layer of a forward reuses it)."""
        key = (batch, seq, str(device))
        if self._flex_mask_key != key:
            from torch.nn.attention.flex_attention import create_block_mask

            def causal(b: Any, h: Any, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
                return q_idx >= kv_idx

            self._flex_mask = create_block_mask(
                causal, B=batch, H=None, Q_LEN=seq, KV_LEN=seq, device=device
            )
            self._flex_mask_key = key
        return self._flex_mask

    @classmethod
    def register_with_transformers(
        cls,
        model_name_or_path: Any,
        core_attn_implementation: str,
        sequence_parallel_size: int,
        micro_batch_size: int,
        seq_length: int | None = None,
        seq_length_is_variable: bool = True,
        disable_in_eval: bool = False,
        max_length: int | None = None,
    ) -> SequenceParallelGroups | None:
        """Install Ulysses SP as ``core_attn_implementation`` in transformers and return the
        ``mpu`` (groups object) to pass to ``initialize(mpu=...)``. With
        ``sequence_parallel_size == 1`` it does nothing and returns None, as DeepSpeed."""
        if sequence_parallel_size == 1:
            return None
        if max_length is not None:
            log.warning("The 'max_length' argument is deprecated, please use 'seq_length' instead")
            if seq_length is None:
                seq_length = max_length
        if not seq_length_is_variable and seq_length is None:
            raise ValueError("Either `seq_length_is_variable` needs to be `True` or `seq_length` needs to be set "
                             "to an integer value of the fixed batch size length.")  # fmt: skip
        import importlib.metadata

        from packaging.version import Version

        have = importlib.metadata.version("transformers")
        if Version(have) < Version(_MIN_TRANSFORMERS):
            raise ValueError(
                f"transformers>={_MIN_TRANSFORMERS} is required, but you have transformers=={have}"
            )
        from transformers import AutoConfig
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        loaded = hasattr(model_name_or_path, "config")
        config = (
            model_name_or_path.config if loaded else AutoConfig.from_pretrained(model_name_or_path)
        )
        if loaded:
            current = getattr(config, "_attn_implementation", None)
            if current is not None and current != core_attn_implementation:
                raise ValueError(
                    f"core_attn_implementation='{core_attn_implementation}' does not match model config "
                    f"attn_implementation='{current}'. Set both to the same value so the sequence-parallel "
                    "wrapper can intercept the active attention path."
                )
        if core_attn_implementation in ("eager", "paged|eager"):
            raise ValueError(f"{core_attn_implementation} attn_implementation isn't supported by Ulysses sequence "
                             "parallelism because it requires a 4D attention_mask (O(n^2) memory). Use 'sdpa', "
                             "'flex_attention', a flash attention variant or a hub kernel (e.g. "
                             "'kernels-community/flash-attn2').")  # fmt: skip
        if _is_hub_kernel(core_attn_implementation):
            # transformers registers hub kernels ("org/repo[@rev][:name]") on first use; do it
            # now so the name is in ALL_ATTENTION_FUNCTIONS to be wrapped
            try:
                from transformers.modeling_flash_attention_utils import lazy_import_flash_attention
            except ImportError as e:
                raise ImportError(
                    f"core_attn_implementation={core_attn_implementation!r} is a hub kernel, which "
                    "needs a transformers exposing transformers.modeling_flash_attention_utils."
                    "lazy_import_flash_attention; upgrade transformers or use 'sdpa'"
                ) from e
            lazy_import_flash_attention(core_attn_implementation)
        if core_attn_implementation not in ALL_ATTENTION_FUNCTIONS:
            raise ValueError(f"{core_attn_implementation} is not a valid attn_implementation. The choices are "
                             f"{list(ALL_ATTENTION_FUNCTIONS.valid_keys())}")  # fmt: skip
        core = ALL_ATTENTION_FUNCTIONS[core_attn_implementation]
        mpu = build_sequence_parallel_groups(sequence_parallel_size)
        arch = config.get_text_config() if hasattr(config, "get_text_config") else config
        head_size = getattr(arch, "head_dim", None) or arch.hidden_size // arch.num_attention_heads
        local = None if seq_length_is_variable else seq_length // sequence_parallel_size  # type: ignore[operator]
        uattn = cls(
            attn=core,
            batch_size=micro_batch_size,
            attn_head_count=arch.num_attention_heads,
            attn_head_size=head_size,
            kv_head_count=getattr(arch, "num_key_value_heads", None) or arch.num_attention_heads,
            num_hidden_layers=arch.num_hidden_layers,
            process_group=mpu.get_sequence_parallel_group(),
            seq_length_is_variable=seq_length_is_variable,
            local_seq_length=local,
            global_seq_length=None if seq_length_is_variable else seq_length,
            disable_in_eval=disable_in_eval,
        )
        uattn.core_attn_implementation = core_attn_implementation
        is_flex = core_attn_implementation == "flex_attention"

        def uattn_wrapper(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                          attention_mask: Any, *args: Any, **kwargs: Any) -> tuple[Tensor, Any]:  # fmt: skip
            # transformers built the mask for the local shard's length, wrong for the gathered
            # sequence (and O(n^2) at full length): causality comes from the gathered
            # position_ids instead. flex_attention's BlockMask (compact) is rebuilt causal for
            # the gathered length in forward.
            mask = attention_mask if is_flex else None
            return uattn(module, query, key, value, mask, *args, **kwargs)

        ALL_ATTENTION_FUNCTIONS[core_attn_implementation] = uattn_wrapper
        return mpu
