"""Small models whose MAC counts are derived by hand in the tests (also run under DeepSpeed's
profiler by compare_deepspeed.py, so both sides see the same modules and inputs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

B, L, H, D = 2, 8, 3, 4  # batch, sequence, heads, head dim
E = H * D


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 32)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.act(self.fc1(x))))


def mlp_input() -> torch.Tensor:
    return torch.randn(B, L, 12)


def mlp_macs() -> int:
    return B * L * (12 * 32 + 32 * 5)


class CNN(nn.Module):
    """Stride, padding, dilation, groups and a transposed convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1)  # 17x17 -> 9x9
        self.c2 = nn.Conv2d(8, 8, kernel_size=3, padding=2, dilation=2, groups=4)  # 9x9 -> 9x9
        self.c3 = nn.ConvTranspose2d(8, 4, kernel_size=2, stride=2)  # 9x9 -> 18x18
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c3(self.relu(self.c2(self.c1(x))))


def cnn_input() -> torch.Tensor:
    return torch.randn(B, 3, 17, 17)


def cnn_macs() -> int:
    c1 = B * 9 * 9 * 8 * 3 * 3 * 3  # out positions x filters x (in channels x kernel)
    c2 = B * 9 * 9 * 8 * (8 // 4) * 3 * 3  # each filter sees in_channels / groups
    c3 = B * 9 * 9 * 8 * 4 * 2 * 2  # transposed: every input position scatters a kernel
    return c1 + c2 + c3


def cnn_bias_flops() -> int:
    """One FLOP per output element of each biased convolution (DeepSpeed's count)."""
    return B * 8 * 9 * 9 + B * 8 * 9 * 9 + B * 4 * 18 * 18  # c1, c2, c3 outputs


class Attention(nn.Module):
    """Scores with @, einsum for the weighted sum, bmm for a second head mix; softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(E, 3 * E)
        self.out = nn.Linear(E, E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).view(B, L, 3, H, D).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) / D**0.5  # [B, H, L, L]
        p = F.softmax(scores, dim=-1)
        ctx = torch.einsum("bhqk,bhkd->bhqd", p, v)  # [B, H, L, D]
        mixed = torch.bmm(ctx.reshape(B * H, L, D), torch.ones(B * H, D, D))
        return self.out(mixed.view(B, H, L, D).transpose(1, 2).reshape(B, L, E))


def attention_input() -> torch.Tensor:
    return torch.randn(B, L, E)


def attention_macs() -> int:
    proj = B * L * E * 3 * E + B * L * E * E
    scores = B * H * L * L * D
    weighted = B * H * L * L * D
    mix = B * H * L * D * D
    return proj + scores + weighted + mix


class SDPA(nn.Module):
    def __init__(self, causal: bool, lk: int = L) -> None:
        super().__init__()
        self.causal = causal
        self.lk = lk

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)


def sdpa_inputs(lq: int = L, lk: int = L, dv: int = D) -> list[torch.Tensor]:
    return [torch.randn(B, H, lq, D), torch.randn(B, H, lk, D), torch.randn(B, H, lk, dv)]


def sdpa_macs(lq: int, lk: int, dv: int, causal: bool) -> int:
    pairs = sum(min(i + 1, lk) for i in range(lq)) if causal else lq * lk
    return B * H * pairs * (D + dv)


class TiedLM(nn.Module):
    """Embedding and an output head that reuses its weight (F.linear on the shared matrix)."""

    def __init__(self, vocab: int = 50) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, E)
        self.ln = nn.LayerNorm(E)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.linear(self.ln(self.emb(ids)), self.emb.weight)


def tied_input(vocab: int = 50) -> torch.Tensor:
    return torch.randint(0, vocab, (B, L))


def tied_macs(vocab: int = 50) -> int:
    return B * L * E * vocab
