"""Tiny models for ds-pipe's tests and an independent single-process reference."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ds_pipe import LayerSpec, TiedLayerSpec

VOCAB, DIM, SEQ = 16, 8, 4
BASE_SEED = 1234


class Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)

    def forward(self, idx):
        return self.emb(idx)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(DIM, DIM)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(DIM, VOCAB)

    def forward(self, x):
        return self.out(x)


class TupleEmbed(nn.Module):
    """Starts a three-tensor stream: (hidden float, token ids int64, gate float)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.gate = nn.Linear(DIM, 1)

    def forward(self, idx):
        h = self.emb(idx)
        return h, idx, torch.sigmoid(self.gate(h))


class TupleBlock(nn.Module):
    """Uses all three tensors: ids feed a second embedding, the gate scales the update."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(DIM, DIM)
        self.pos = nn.Embedding(VOCAB, DIM)

    def forward(self, inputs):
        h, idx, gate = inputs
        h = h + gate * torch.tanh(self.fc(h) + self.pos(idx))
        return h, idx, gate * 0.9 + 0.05


class TupleHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(DIM, VOCAB)

    def forward(self, inputs):
        h, _, gate = inputs
        return self.out(h * gate)


def loss_fn(logits, labels):
    return F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))


def tied_head(emb: nn.Embedding, x):
    return x @ emb.weight.t()


def specs(kind: str, n_blocks: int) -> list:
    if kind == "plain":
        return [LayerSpec(Embed)] + [LayerSpec(Block) for _ in range(n_blocks)] + [LayerSpec(Head)]
    if kind == "tied":
        return (
            [TiedLayerSpec("emb", nn.Embedding, VOCAB, DIM)]
            + [LayerSpec(Block) for _ in range(n_blocks)]
            + [TiedLayerSpec("emb", nn.Embedding, VOCAB, DIM, forward_fn=tied_head)]
        )
    if kind == "tuple":
        return (
            [LayerSpec(TupleEmbed)]
            + [LayerSpec(TupleBlock) for _ in range(n_blocks)]
            + [LayerSpec(TupleHead)]
        )
    raise ValueError(kind)


def data(step: int, replica: int, micro_batches: int, micro_batch_size: int):
    """Deterministic (inputs, labels) micro-batches for one step of one data-parallel replica."""
    g = torch.Generator().manual_seed(100 * step + replica)
    out = []
    for _ in range(micro_batches):
        x = torch.randint(0, VOCAB, (micro_batch_size, SEQ), generator=g)
        out.append((x, (x * 3 + 1) % VOCAB))
    return out


class Reference(nn.Module):
    """The same layers as one sequential model, built with the same per-layer seeds.

    Written independently of PipelineModule: parameter names ``layers.<i>.*`` / ``tied.<key>.*``
    are reproduced here so the pipeline's gradients can be compared by name.
    """

    def __init__(self, layer_specs: list) -> None:
        super().__init__()
        self.layers = nn.ModuleDict()
        self.tied = nn.ModuleDict()
        self.fns = []
        for i, spec in enumerate(layer_specs):
            if isinstance(spec, TiedLayerSpec):
                if spec.key not in self.tied:
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(BASE_SEED + i)
                        self.tied[spec.key] = spec.typename(*spec.module_args, **spec.module_kwargs)
                m = self.tied[spec.key]
                self.fns.append(functools.partial(spec.forward_fn, m) if spec.forward_fn else m)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(BASE_SEED + i)
                    m = spec.typename(*spec.module_args, **spec.module_kwargs)
                self.layers[str(i)] = m
                self.fns.append(m)

    def forward(self, x):
        for f in self.fns:
            x = f(x)
        return x


class PlainSGD:
    """SGD without torch.optim: constructing a torch optimizer imports torch._dynamo, which
    costs seconds per spawned rank on a loaded CI machine."""

    def __init__(self, params, lr: float) -> None:
        self.params = list(params)
        self.lr = lr

    @torch.no_grad()
    def step(self) -> None:
        for p in self.params:
            if p.grad is not None:
                p.add_(p.grad, alpha=-self.lr)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


def reference_run(layer_specs, steps, micro_batches, micro_batch_size, replicas, lr=0.1):
    """Single-process SGD on the concatenated data of all replicas; per-step losses and grads."""
    model = Reference(layer_specs)
    opt = PlainSGD(model.parameters(), lr=lr)
    losses, grads = [], []
    for step in range(steps):
        batches = [
            b for r in range(replicas) for b in data(step, r, micro_batches, micro_batch_size)
        ]
        loss = sum(loss_fn(model(x), y) for x, y in batches) / len(batches)
        opt.zero_grad()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        losses.append(loss.item())
        opt.step()
    return losses, grads, {n: p.detach().clone() for n, p in model.named_parameters()}
