"""A released ZeRO-3 parameter looks like DeepSpeed's to outside code: ``.data`` has no elements
(an in-place init of a parameter nobody gathered does nothing), the full size is in
``ds_shape`` / ``ds_numel``, every stage-3 parameter has a ``ds_id``; gathered parameters keep
training exactly like plain PyTorch. One process, a world of one."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))

from _models import config  # noqa: E402

VOCAB, D, SEQ, MICRO = 40, 16, 8, 4


class Parent(nn.Module):
    """Owns ``scale`` and a child ``proj``; its init function also touches the child's weight
    (as GPT-2's ``_init_weights`` touches ``c_proj.weight`` of a child Conv1D)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(D))
        self.proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(F.gelu(x * self.scale))


class Tree(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList(Parent() for _ in range(2))
        self.head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.tok(x)
        for b in self.blocks:
            h = b(h)
        return F.cross_entropy(self.head(h).reshape(-1, VOCAB), y.reshape(-1))


def _init_fn(module: nn.Module) -> None:
    if isinstance(module, Parent):
        nn.init.constant_(module.scale, 0.5)
        nn.init.normal_(module.proj.weight, std=3.0)  # the child's: not gathered by the caller


def _walk_own_params(model: nn.Module, init_fn, gathered_parameters) -> None:
    """Each module's own parameters gathered (recurse=False), then its init function."""
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        with gathered_parameters(params, modifier_rank=0):
            init_fn(module)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7 + step)
    x = torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def _cfg() -> dict:
    cfg = config(3, MICRO)
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    cfg["gradient_clipping"] = 0.0
    del cfg["scheduler"]
    return cfg


def test_init_of_an_ungathered_child_is_a_no_op_and_training_is_unchanged() -> None:
    import ds_all

    torch.manual_seed(0)
    plain = Tree()
    torch.manual_seed(0)
    with ds_all.zero.Init(config_dict_or_path=_cfg()):
        model = Tree()
    params = dict(model.named_parameters())
    w = params["blocks.0.proj.weight"]
    assert w.numel() == 0 and w.dtype == torch.float32
    assert w.ds_shape == (D, D) and w.ds_numel == D * D
    assert len({p.ds_id for p in params.values()}) == len(params)

    _walk_own_params(model, _init_fn, ds_all.zero.GatheredParameters)

    # DeepSpeed's semantics: the parents' own scale is set, the children's weights untouched
    with torch.no_grad():
        for b in plain.blocks:
            b.scale.fill_(0.5)
    with ds_all.zero.GatheredParameters(list(model.parameters())):
        for name, p in model.named_parameters():
            assert torch.equal(p, plain.get_parameter(name)), name
    assert w.numel() == 0

    engine, _, _, _ = ds_all.initialize(model=model, config=_cfg(), dist_init_required=False)
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.01)
    seen: list[tuple[int, ...]] = []
    hook = engine.module.blocks[1].proj.register_forward_pre_hook(
        lambda m, a: seen.append(tuple(m.weight.shape))
    )
    for step in range(3):
        x, y = _batch(step)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        ref = plain(x, y)
        ref.backward()
        opt.step()
        opt.zero_grad()
        assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
        assert w.numel() == 0 and w.ds_numel == D * D  # released again after the step
    hook.remove()
    assert seen == [(D, D)] * 3  # whole while its unit runs
    state = engine.zero.full_state_dict()
    for name, p in plain.named_parameters():
        torch.testing.assert_close(state[name], p.detach(), rtol=1e-5, atol=1e-6)
    # a released parameter's in-place op does nothing on a wrapped model either
    with torch.no_grad():
        nn.init.normal_(w)
    assert torch.equal(
        engine.zero.full_state_dict()["blocks.0.proj.weight"], state["blocks.0.proj.weight"]
    )
    engine.close()


def test_transformers_517_zero3_init_walk_on_gpt2() -> None:
    """Transformers 5.17's ``initialize_weights_zero3`` gathers each module's own parameters and
    calls ``_init_weights``; GPT-2's also writes ``c_proj.weight`` of a child it did not gather.
    With DeepSpeed that write does nothing; it must not raise here either."""
    transformers = pytest.importorskip("transformers")
    import ds_all

    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=D, n_layer=2, n_head=2, initializer_range=0.02
    )
    torch.manual_seed(0)
    with ds_all.zero.Init(config_dict_or_path=_cfg()):
        model = transformers.GPT2LMHeadModel(cfg)

    ungathered_child: list[str] = []

    def initialize_weights_zero3(model: nn.Module) -> None:  # transformers 5.17's walk
        for name, module in model.named_modules():
            params = list(module.parameters(recurse=False))
            with ds_all.zero.GatheredParameters(params, modifier_rank=0):
                child = getattr(module, "c_proj", None)
                if child is not None and child.weight.numel() == 0:
                    ungathered_child.append(name)
                model._init_weights(module)

    initialize_weights_zero3(model)
    # the attention and MLP blocks wrote to their child c_proj.weight, which was released
    assert len(ungathered_child) == 2 * cfg.n_layer, ungathered_child
    block = model.transformer.h[0]
    with ds_all.zero.GatheredParameters(list(model.parameters())):
        for m in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
            assert torch.all(m.bias == 0)
            # Conv1D's own init (std initializer_range), not the parent's no-op
            assert 0.01 < float(m.weight.detach().std()) < 0.03
        assert torch.all(block.ln_1.weight == 1)

    engine, _, _, _ = ds_all.initialize(model=model, config=_cfg(), dist_init_required=False)
    x, y = _batch(0)
    loss = engine(input_ids=x, labels=x).loss
    engine.backward(loss)
    engine.step()
    assert torch.isfinite(loss) and abs(loss.item() - torch.log(torch.tensor(VOCAB)).item()) < 1.0
    del y
    engine.close()
