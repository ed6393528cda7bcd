"""Word tokenizer and the small text encoder trained jointly with the transformer.

The encoder plays both of FLUX's text models: per-token context [B, T, context_dim]
(T5's role, fed to `txt_in`) and a pooled vector [B, vec_dim] (CLIP's role, fed to
`vector_in`).  FLUX gives text tokens no rotary position (txt_ids are zero), so
word order has to live in the context itself: hence learned positions and a few
bidirectional attention layers, not a bag of word embeddings.  Padding tokens are
attended like any other (as FLUX attends T5's padding), so no mask is needed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .scenes import VOCAB


@dataclass
class TextConfig:
    vocab: tuple[str, ...] = VOCAB
    max_len: int = 12
    width: int = 128
    depth: int = 2
    heads: int = 4
    context_dim: int = 128
    vec_dim: int = 128

    def to_dict(self) -> dict:
        d = asdict(self)
        d["vocab"] = list(self.vocab)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TextConfig:
        d = dict(d)
        d["vocab"] = tuple(d["vocab"])
        return cls(**d)


class Tokenizer:
    """Whitespace word tokenizer over a closed vocabulary; id 0 pads."""

    def __init__(self, vocab: tuple[str, ...], max_len: int) -> None:
        self.vocab, self.max_len = vocab, max_len
        self.index = {w: i for i, w in enumerate(vocab)}

    def encode(self, prompts: list[str]) -> Tensor:
        out = torch.zeros(len(prompts), self.max_len, dtype=torch.long)
        for i, p in enumerate(prompts):
            words = p.split()
            if len(words) > self.max_len:
                raise ValueError(f"prompt longer than {self.max_len} words: {p!r}")
            unknown = [w for w in words if w not in self.index]
            if unknown:
                raise ValueError(f"words outside the vocabulary {unknown} in {p!r}")
            out[i, : len(words)] = torch.tensor([self.index[w] for w in words], dtype=torch.long)
        return out


class _Block(nn.Module):
    """Pre-norm transformer encoder layer."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, w)
        x = x + self.proj(a)
        return x + self.mlp(self.norm2(x))


class TextEncoder(nn.Module):
    def __init__(self, config: TextConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or TextConfig()
        self.tokenizer = Tokenizer(config.vocab, config.max_len)
        # Token and position embeddings start at the same scale (GPT-2 / CLIP): with
        # nn.Embedding's N(0, 1) tokens against 0.02 positions, the first LayerNorm
        # left word order at ~4% of the signal and the encoder stayed nearly a bag
        # of words (swapped colour-attribute captions gave pooled vectors with cosine 1.000).
        self.tok_emb = nn.Embedding(len(config.vocab), config.width)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        self.pos_emb = nn.Parameter(torch.randn(config.max_len, config.width) * 0.02)
        self.blocks = nn.ModuleList(_Block(config.width, config.heads) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.width)
        self.context_proj = nn.Linear(config.width, config.context_dim)
        self.pooled_proj = nn.Linear(config.width, config.vec_dim)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """tokens [B, T] -> (context [B, T, context_dim], pooled [B, vec_dim])."""
        x = self.tok_emb(tokens) + self.pos_emb[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return self.context_proj(x), self.pooled_proj(x.mean(dim=1))

    def tokenize(self, prompts: list[str]) -> Tensor:
        return self.tokenizer.encode(prompts).to(self.pos_emb.device)

    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Context and pooled vector for prompts ("" = unconditional)."""
        return self(self.tokenize(prompts))
