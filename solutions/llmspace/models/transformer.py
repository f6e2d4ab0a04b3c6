"""The small transformer whose saved tensors chapter 2 counts (GPT-2 or Llama shaped), its
configurations, and the Llama-2 shapes. Part of :mod:`llmspace.models` (the models the book measures);
:mod:`llmspace.memory` re-exports every name, so ``from llmspace.memory import Transformer`` works too."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["TransformerConfig", "Transformer", "SMALL_CONFIGS", "LLAMA2_7B", "LLAMA2_70B"]


# --------------------------------------------------------------------------------------------------
# A small transformer whose saved tensors we can count
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TransformerConfig:
    """Shape of a pre-norm decoder-only transformer.

    ``attention="sdpa"`` uses ``F.scaled_dot_product_attention`` (on CPU a FlashAttention-style kernel
    that saves q, k, v, the output and one log-sum-exp per row: no ``seq_len**2`` term);
    ``attention="math"`` writes softmax(QKᵀ)V out and saves the ``batch*heads*seq_len**2`` probabilities.
    """
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    max_seq_len: int = 1024
    n_kv_heads: int | None = None          # None: multi-head attention (= n_heads)
    norm: str = "layernorm"                # "layernorm" | "rmsnorm"
    mlp: str = "gelu"                      # "gelu" | "swiglu"
    bias: bool = True
    learned_positions: bool = True
    tie_embeddings: bool = False
    attention: str = "sdpa"                # "sdpa" | "math"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.kv_heads})")
        for name, allowed in (("norm", ("layernorm", "rmsnorm")), ("mlp", ("gelu", "swiglu")),
                              ("attention", ("sdpa", "math"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.attention == "math" and self.kv_heads != self.n_heads:
            raise ValueError("attention='math' supports only n_kv_heads == n_heads")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads


#: Three small shapes the estimator is tested on (GPT-2-like, Llama-like with GQA, explicit attention).
SMALL_CONFIGS = {
    "gpt-tiny": TransformerConfig(vocab_size=512, d_model=128, n_layers=4, n_heads=4, d_ff=512),
    "llama-tiny": TransformerConfig(vocab_size=512, d_model=128, n_layers=4, n_heads=8, d_ff=352,
                                    n_kv_heads=2, norm="rmsnorm", mlp="swiglu", bias=False,
                                    learned_positions=False),
    "gpt-math-attn": TransformerConfig(vocab_size=256, d_model=96, n_layers=3, n_heads=4, d_ff=384,
                                       attention="math", tie_embeddings=True),
}
#: Llama-2 shapes (Touvron et al. 2023, Table 1 / the released config.json); 6,738,415,616 and
#: 68,976,648,192 parameters.
LLAMA2_7B = TransformerConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, d_ff=11008,
                              max_seq_len=4096, norm="rmsnorm", mlp="swiglu", bias=False,
                              learned_positions=False)
LLAMA2_70B = replace(LLAMA2_7B, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=28672)


def _norm(config: TransformerConfig) -> nn.Module:
    if config.norm == "layernorm":
        return nn.LayerNorm(config.d_model, bias=config.bias)
    return nn.RMSNorm(config.d_model)


class Attention(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        kv = config.kv_heads * config.head_dim
        self.qkv = nn.Linear(config.d_model, config.d_model + 2 * kv, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, d_model)
        c, (B, T, _) = self.config, x.shape
        kv = c.kv_heads * c.head_dim
        q, k, v = self.qkv(x).split([c.d_model, kv, kv], dim=-1)
        q = q.view(B, T, c.n_heads, c.head_dim).transpose(1, 2)       # (B, h, T, hd)
        k = k.view(B, T, c.kv_heads, c.head_dim).transpose(1, 2)
        v = v.view(B, T, c.kv_heads, c.head_dim).transpose(1, 2)
        if c.attention == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=c.kv_heads != c.n_heads)
        else:
            scores = (q @ k.transpose(-2, -1)) * c.head_dim ** -0.5
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            y = scores.masked_fill(mask, float("-inf")).softmax(dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(B, T, c.d_model))


class MLP(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.gated = config.mlp == "swiglu"
        self.up = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.gate = nn.Linear(config.d_model, config.d_ff, bias=config.bias) if self.gated else None
        self.down = nn.Linear(config.d_ff, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.norm1, self.attn = _norm(config), Attention(config)
        self.norm2, self.mlp = _norm(config), MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """Decoder-only language model. ``forward(tokens)`` → logits ``(B, T, vocab)``;
    ``loss(tokens, targets)`` → mean next-token cross-entropy (a 0-d tensor)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.pos = nn.Embedding(config.max_seq_len, config.d_model) if config.learned_positions else None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = _norm(config)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        if self.pos is not None:
            x = x + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        return x

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self(tokens)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
