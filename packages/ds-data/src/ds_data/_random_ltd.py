"""random-LTD: layers that see a random subset of the tokens, gathered and scattered back.

A wrapped layer (``RandomLayerTokenDrop``) receives the full hidden states, keeps
``reserved_length`` tokens per sample (the scheduler's current value), runs the layer on them
and writes the results back into the positions they came from; the dropped tokens pass
through unchanged. One index draw per step serves every wrapped layer (layer ``i`` uses row
``i``), as in DeepSpeed. Gather and scatter are plain ``torch.gather``/``Tensor.scatter``, whose
gradients PyTorch derives: the dropped tokens' gradient flows straight through, the kept
tokens' through the layer.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._errors import DataConfigError
from ._ltd_schedule import RandomLTDScheduler

__all__ = [
    "RandomLayerTokenDrop",
    "bert_sample_tokens",
    "convert_to_random_ltd",
    "gather_tokens",
    "gpt_sample_tokens",
    "random_ltd_initialize",
    "remove_random_ltd_state_dict",
    "save_without_random_ltd",
    "scatter_tokens",
]

_SAMPLE_INDEX = "sample_idx"
_ATTENTION_MASK = "attention_mask"


def _draw(reserved_length: int, seq_length: int, batch_size: int, layers: int, device) -> Tensor:
    """Sorted random token indices ``(layers, batch, reserved_length)`` (int64).

    The same draw as DeepSpeed's (uniform ``torch.multinomial`` without replacement, then
    sorted), so a run seeded alike keeps the same tokens.
    """
    if not 0 < reserved_length <= seq_length:
        raise ValueError(f"reserved_length {reserved_length} must be in [1, {seq_length}]")
    weights = torch.ones((layers * batch_size, seq_length), device=device)
    picked = torch.multinomial(weights, reserved_length)
    return picked.reshape(layers, batch_size, reserved_length).sort(dim=-1).values


def gpt_sample_tokens(reserved_length: int, seq_length: int, batch_size: int, layers: int = 1,
                      device: Any = "cpu", attn_mask: Tensor | None = None):  # fmt: skip
    """Indices for decoder models; the causal mask is cut to ``reserved_length`` (a causal mask
    over the kept tokens, which stay in order, is the top-left corner of the full one)."""
    indices = _draw(reserved_length, seq_length, batch_size, layers, device)
    new_mask = None if attn_mask is None else attn_mask[:, :, :reserved_length, :reserved_length]
    return indices, new_mask


def bert_sample_tokens(reserved_length: int, seq_length: int, batch_size: int, layers: int = 1,
                       device: Any = "cpu", attn_mask: Tensor | None = None):  # fmt: skip
    """Indices for encoder models and, per layer, the attention mask restricted to the kept
    tokens (``(batch, 1, reserved, reserved)`` each)."""
    if attn_mask is None:
        raise ValueError("encoder random-LTD needs the attention mask (model_mask_name)")
    indices = _draw(reserved_length, seq_length, batch_size, layers, device)
    masks = []
    for layer in range(layers):
        rows = [attn_mask[i : i + 1, :, indices[layer, i], :][:, :, :, indices[layer, i]]
                for i in range(batch_size)]  # fmt: skip
        masks.append(torch.cat(rows, dim=0))
    return indices, masks


def _expand(indices: Tensor, like: Tensor, batch_first: bool) -> tuple[Tensor, int]:
    index = indices if batch_first else indices.t()
    shape = list(like.shape)
    shape[1 if batch_first else 0] = index.shape[1 if batch_first else 0]
    index = index.reshape(*index.shape, *([1] * (like.dim() - 2))).expand(shape)
    return index, 1 if batch_first else 0


def gather_tokens(hidden_states: Tensor, indices: Tensor, batch_first: bool) -> Tensor:
    """The kept tokens: ``indices`` is ``(batch, reserved)``; hidden states ``(batch, seq, ...)``
    when ``batch_first`` else ``(seq, batch, ...)``."""
    index, dim = _expand(indices.long(), hidden_states, batch_first)
    return torch.gather(hidden_states, dim, index)


def scatter_tokens(
    hidden_states: Tensor, part: Tensor, indices: Tensor, batch_first: bool
) -> Tensor:
    """``hidden_states`` with the kept positions replaced by ``part`` (out of place)."""
    index, dim = _expand(indices.long(), part, batch_first)
    return hidden_states.scatter(dim, index, part)


class RandomLayerTokenDrop(nn.Module):
    """Wraps a layer for random-LTD (DeepSpeed's class and state-dict naming).

    Until ``init_config`` attaches a scheduler, and outside training, the layer runs on every
    token. ``forward(hidden_states, **kwargs)``: the mask keyword named by ``model_mask_name``
    is replaced by the mask over the kept tokens; a tuple output has its first element
    scattered back.
    """

    random_ltd_layer: nn.Module
    random_ltd_scheduler: RandomLTDScheduler | None

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.random_ltd_layer = layer
        self.random_ltd_scheduler = None
        self.random_ltd_layer_id = -1
        self.reserved_length = -1
        self.max_length: int | None = None
        self.mask_name: str | None = None
        self.batch_first = False
        self.model_type = "decoder"

    def init_config(self, config: Mapping[str, Any], scheduler: RandomLTDScheduler,
                    random_ltd_layer_id: int) -> None:  # fmt: skip
        order = config.get("hidden_state_order")
        if order not in ("batch_seq_dim", "seq_batch_dim"):
            raise DataConfigError(
                f"random_ltd 'hidden_state_order' must be 'batch_seq_dim' or 'seq_batch_dim', "
                f"got {order!r}"
            )
        model_type = config.get("model_type")
        if model_type not in ("encoder", "decoder"):
            raise DataConfigError(
                f"random_ltd 'model_type' must be 'encoder' or 'decoder', got {model_type!r}"
            )
        self.random_ltd_scheduler = scheduler
        self.random_ltd_layer_id = random_ltd_layer_id
        self.max_length = scheduler.state["max_value"]
        self.mask_name = config.get("model_mask_name")
        self.batch_first = order == "batch_seq_dim"
        self.model_type = model_type

    def forward(self, hidden_states: Tensor, **kwargs: Any):
        scheduler = self.random_ltd_scheduler
        if scheduler is None or not self.training:
            return self.random_ltd_layer(hidden_states, **kwargs)
        self.reserved_length = scheduler.get_current_seq()
        seq_dim, batch_dim = (1, 0) if self.batch_first else (0, 1)
        seq, batch = hidden_states.shape[seq_dim], hidden_states.shape[batch_dim]
        if self.reserved_length >= seq:
            return self.random_ltd_layer(hidden_states, **kwargs)
        mask = kwargs.get(self.mask_name) if self.mask_name is not None else None
        if self.random_ltd_layer_id == 0:
            sample = gpt_sample_tokens if self.model_type == "decoder" else bert_sample_tokens
            indices, part_mask = sample(self.reserved_length, seq, batch,
                                        scheduler.get_random_ltd_layer_num(),
                                        hidden_states.device, mask)  # fmt: skip
            scheduler.state[_SAMPLE_INDEX] = indices
            scheduler.state[_ATTENTION_MASK] = part_mask
        else:
            indices = scheduler.state[_SAMPLE_INDEX]
            part_mask = scheduler.state[_ATTENTION_MASK]
        rows = indices[self.random_ltd_layer_id]
        part = gather_tokens(hidden_states, rows, self.batch_first)
        if self.mask_name is not None:
            kwargs[self.mask_name] = (
                part_mask[self.random_ltd_layer_id] if self.model_type == "encoder" else part_mask
            )
        outputs = self.random_ltd_layer(part, **kwargs)
        if isinstance(outputs, Tensor):
            return scatter_tokens(hidden_states, outputs, rows, self.batch_first)
        if isinstance(outputs, tuple):
            merged = scatter_tokens(hidden_states, outputs[0], rows, self.batch_first)
            return (merged, *outputs[1:])
        raise TypeError(
            f"a random-LTD layer must return a tensor or a tuple whose first element is the "
            f"hidden states, got {type(outputs).__name__}"
        )


def _owner(model: nn.Module) -> nn.Module:
    return model.module if isinstance(getattr(model, "module", None), nn.Module) else model


def convert_to_random_ltd(model: nn.Module, convert_type: type[nn.Module]) -> nn.Module:
    """Wraps every ``convert_type`` submodule in ``RandomLayerTokenDrop``.

    Given an engine (an object with ``random_ltd_initialize()``), also attaches its scheduler
    to the configured layers, as DeepSpeed's helper does.
    """
    root = _owner(model)
    targets = [name for name, m in root.named_modules() if isinstance(m, convert_type) and name]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, RandomLayerTokenDrop(getattr(parent, child)))
    initialize = getattr(model, "random_ltd_initialize", None)
    if callable(initialize):
        initialize()
    return model


def random_ltd_initialize(model: nn.Module, config: Mapping[str, Any],
                          scheduler: RandomLTDScheduler) -> int:  # fmt: skip
    """Attaches ``scheduler`` to the wrapped layers listed in ``random_ltd_layer_id``.

    A wrapped layer is chosen when one component of its module name is the id (``layers.3``
    for id 3); DeepSpeed matches the id as a substring of the name, which can pick
    ``layers.12`` for id 1 or 2. Returns the number of layers configured; it must equal
    ``random_ltd_layer_num``.
    """
    wanted = deque(sorted(config.get("random_ltd_layer_id", [])))
    count = 0
    for name, layer in _owner(model).named_modules():
        if isinstance(layer, RandomLayerTokenDrop) and wanted and str(wanted[0]) in name.split("."):
            layer.init_config(config, scheduler, count)
            wanted.popleft()
            count += 1
    expected = config.get("random_ltd_layer_num")
    if expected != count:
        raise DataConfigError(
            f"random_ltd: random_ltd_layer_num is {expected} but {count} wrapped layers match "
            f"random_ltd_layer_id {sorted(config.get('random_ltd_layer_id', []))}: wrap the layers "
            f"with convert_to_random_ltd and list their indices"
        )
    return count


def remove_random_ltd_state_dict(state_dict: Mapping[str, Tensor]) -> OrderedDict[str, Tensor]:
    """The state dict with the wrapper's ``.random_ltd_layer`` segment removed, so it loads into
    the unwrapped model."""
    return OrderedDict(
        (key.replace(".random_ltd_layer", ""), value) for key, value in state_dict.items()
    )


def save_without_random_ltd(model: nn.Module) -> OrderedDict[str, Tensor]:
    return remove_random_ltd_state_dict(_owner(model).state_dict())
