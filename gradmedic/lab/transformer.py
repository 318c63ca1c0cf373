"""A CPU-sized Transformer language model for the lab, in the four residual/normalisation layouts whose
trainability at depth the literature compares.

- ``post``: ``x = LN(x + f(x))`` for the attention and the feed-forward sublayer (Vaswani et al. 2017).
  Xiong et al. (2020) show its gradient near the output is large at init, so it needs a learning-rate
  warmup, more so with depth (Liu et al. 2020).
- ``pre``: ``x = x + f(LN(x))``, with a final LN (Xiong et al. 2020): well-behaved gradients at init.
- ``rezero``: ``x = x + alpha f(x)`` with a learned ``alpha = 0`` at init and no LN (Bachlechner et al.
  2020): every block starts as the identity, so any depth starts with a clean gradient path.
- ``deepnorm``: ``x = LN(a x + f(x))`` with ``a = (2N)^(1/4)`` and the value/output/feed-forward weights
  scaled by ``b = (8N)^(-1/4)`` at init, N the number of blocks (Wang et al. 2022, encoder form).

The model reads token ids (B, T) with causal self-attention and predicts from the last position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from gradmedic._errors import bad_argument

__all__ = ["VARIANTS", "TransformerSpec", "build_transformer"]

VARIANTS = ("post", "pre", "rezero", "deepnorm")


@dataclass(frozen=True)
class TransformerSpec:
    depth: int = 4  # blocks (attention + feed-forward each)
    width: int = 32  # d_model
    heads: int = 2
    ff: int = 64  # feed-forward hidden width
    variant: str = "pre"  # one of VARIANTS
    vocab: int = 32
    max_len: int = 64
    d_out: int = 8


class _Block(nn.Module):
    def __init__(self, spec: TransformerSpec):
        super().__init__()
        self.heads, self.variant = spec.heads, spec.variant
        self.qkv = nn.Linear(spec.width, 3 * spec.width)
        self.out = nn.Linear(spec.width, spec.width)
        self.ff = nn.Sequential(nn.Linear(spec.width, spec.ff), nn.GELU(), nn.Linear(spec.ff, spec.width))
        if spec.variant != "rezero":
            self.norm1, self.norm2 = nn.LayerNorm(spec.width), nn.LayerNorm(spec.width)
        else:
            self.alpha = nn.Parameter(torch.zeros(()))
        self.a = (2 * spec.depth) ** 0.25 if spec.variant == "deepnorm" else 1.0

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.variant == "pre":
            x = x + self.attention(self.norm1(x))
            return x + self.ff(self.norm2(x))
        if self.variant == "rezero":
            x = x + self.alpha * self.attention(x)
            return x + self.alpha * self.ff(x)
        x = self.norm1(self.a * x + self.attention(x))  # post (a = 1) and deepnorm
        return self.norm2(self.a * x + self.ff(x))


class TransformerLM(nn.Module):
    """Token + position embeddings -> blocks -> [final LN for pre-LN] -> a head on the last position."""

    def __init__(self, spec: TransformerSpec):
        super().__init__()
        self.embed = nn.Embedding(spec.vocab, spec.width)
        self.position = nn.Embedding(spec.max_len, spec.width)
        self.blocks = nn.ModuleList(_Block(spec) for _ in range(spec.depth))
        self.norm = nn.LayerNorm(spec.width) if spec.variant == "pre" else nn.Identity()
        self.head = nn.Linear(spec.width, spec.d_out)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) int64
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.embed(tokens) + self.position(positions)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h)[:, -1])


def build_transformer(spec: TransformerSpec, seed: int = 0) -> nn.Module:
    if not isinstance(spec.depth, int) or spec.depth < 1:
        raise bad_argument("depth", "a positive int", spec.depth)
    if spec.variant not in VARIANTS:
        raise bad_argument("variant", f"one of {VARIANTS}", spec.variant)
    if spec.width % spec.heads:
        raise bad_argument("heads", f"a divisor of width={spec.width}", spec.heads)
    torch.manual_seed(seed)
    model = TransformerLM(spec)
    if spec.variant == "deepnorm":  # Wang et al. 2022: scale v, out and the feed-forward by beta at init
        beta = (8 * spec.depth) ** -0.25
        with torch.no_grad():
            for block in model.blocks:
                block.qkv.weight[2 * spec.width:].mul_(beta)
                for layer in (block.out, block.ff[0], block.ff[2]):
                    nn.init.xavier_normal_(layer.weight, gain=beta)
    return model
