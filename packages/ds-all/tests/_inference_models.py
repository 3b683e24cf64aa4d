"""Small models for the init_inference tests (importable by spawned ranks), each shaped as a
family AutoTP must handle: Llama's names, BERT's post-norm layout, and a layer whose output
projections only an injection_policy can name."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 40
SEQ = 6


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    b, s, _ = q.shape
    q, k, v = (t.view(b, s, heads, -1).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


class LlamaAttention(nn.Module):
    def __init__(self, h: int, heads: int) -> None:
        super().__init__()
        self.num_heads, self.hidden_size = heads, h  # reshapes read both: AutoTP divides them
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(h, h, bias=False) for _ in range(3))
        self.o_proj = nn.Linear(h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = _attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.num_heads)
        return self.o_proj(a.reshape(*x.shape[:2], self.hidden_size))


class LlamaMLP(nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(h, 2 * h, bias=False), nn.Linear(h, 2 * h)
        self.down_proj = nn.Linear(2 * h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nn.Module):
    def __init__(self, h: int, heads: int) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(h)
        self.self_attn = LlamaAttention(h, heads)
        self.post_attention_layernorm = nn.LayerNorm(h)
        self.mlp = LlamaMLP(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaLike(nn.Module):
    """Llama's module names; ``tied``: the LM head shares the embedding's weight."""

    def __init__(self, h: int = 16, heads: int = 4, layers: int = 2, tied: bool = False) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, h)
        self.layers = nn.ModuleList(LlamaLayer(h, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(h)
        self.lm_head = nn.Linear(h, VOCAB, bias=False)
        if tied:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 3) -> torch.Tensor:
        """Greedy decoding (what a transformers model's generate is to the engine)."""
        for _ in range(max_new_tokens):
            nxt = self(input_ids)[:, -1].argmax(-1, keepdim=True)
            input_ids = torch.cat([input_ids, nxt], dim=1)
        return input_ids


class BertSelfAttention(nn.Module):
    def __init__(self, h: int, heads: int) -> None:
        super().__init__()
        self.num_attention_heads, self.all_head_size = heads, h
        self.query, self.key, self.value = (nn.Linear(h, h) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = _attend(self.query(x), self.key(x), self.value(x), self.num_attention_heads)
        return a.reshape(*x.shape[:2], self.all_head_size)


class BertOutput(nn.Module):
    def __init__(self, h_in: int, h: int) -> None:
        super().__init__()
        self.dense = nn.Linear(h_in, h)
        self.LayerNorm = nn.LayerNorm(h)

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(y) + x)


class BertAttention(nn.Module):
    def __init__(self, h: int, heads: int) -> None:
        super().__init__()
        self.self = BertSelfAttention(h, heads)
        self.output = BertOutput(h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x), x)


class BertIntermediate(nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.dense = nn.Linear(h, 4 * h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, h: int, heads: int) -> None:
        super().__init__()
        self.attention = BertAttention(h, heads)
        self.intermediate = BertIntermediate(h)
        self.output = BertOutput(4 * h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention(x)
        return self.output(self.intermediate(x), x)


class BertLike(nn.Module):
    """BERT's post-norm layout: the output projections are found by the LayerNorm after them."""

    def __init__(self, h: int = 16, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(VOCAB, h)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(BertLayer(h, heads) for _ in range(layers))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(ids)
        for layer in self.encoder.layer:
            x = layer(x)
        return x


class RMSNorm(nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class PlainLayer(nn.Module):
    """Output projections with names no rule recognises and no LayerNorm after them."""

    def __init__(self, h: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(h), RMSNorm(h)
        self.attn = nn.Module()
        self.attn.wq, self.attn.wk, self.attn.wv = (nn.Linear(h, h) for _ in range(3))
        self.attn.wo = nn.Linear(h, h)
        self.attn.n_heads = heads
        self.ffn = nn.Module()
        self.ffn.w_in, self.ffn.w_out = nn.Linear(h, 3 * h), nn.Linear(3 * h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, y = self.attn, self.norm1(x)
        o = _attend(a.wq(y), a.wk(y), a.wv(y), a.n_heads)
        x = x + a.wo(o.reshape(*x.shape[:2], -1))
        return x + self.ffn.w_out(F.gelu(self.ffn.w_in(self.norm2(x))))


class PlainLike(nn.Module):
    def __init__(self, h: int = 16, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, h)
        self.blocks = nn.ModuleList(PlainLayer(h, heads) for _ in range(layers))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(ids)
        for block in self.blocks:
            x = block(x)
        return x


def ids(seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def tiny_llama_config():  # a transformers LlamaConfig (transformers imported by the caller)
    import transformers

    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
