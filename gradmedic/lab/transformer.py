"""A CPU-sized Transformer language model for the lab, in the five residual/normalisation layouts whose
trainability at depth the literature compares.

- ``post``: ``x = LN(x + f(x))`` for the attention and the feed-forward sublayer (Vaswani et al. 2017).
  Xiong et al. (2020) show its gradient near the output is large at init, so it needs a learning-rate
  warmup, more so with depth (Liu et al. 2020).
- ``pre``: ``x = x + f(LN(x))``, with a final LN (Xiong et al. 2020): well-behaved gradients at init.
- ``rezero``: ``x = x + alpha f(x)`` with a learned ``alpha = 0`` at init and no LN (Bachlechner et al.
  2020): every block starts as the identity, so any depth starts with a clean gradient path.
- ``deepnorm``: ``x = LN(a x + f(x))`` with ``a = (2N)^(1/4)`` and the value/output/feed-forward weights
  scaled by ``b = (8N)^(-1/4)`` at init, N the number of blocks (Wang et al. 2022, encoder form).
- ``layerscale``: pre-LN with a learned per-channel gain on each branch, ``x = x + diag(g) f(LN(x))``,
  ``g = eps`` at init with eps chosen by depth as CaiT does (Touvron et al. 2021, ``layerscale_eps``): each
  block starts close to the identity, yet every channel of its branch learns at once (ReZero's one scalar
  starts at exactly 0).

Post-LN with a learning-rate warmup is a recipe, not a layout: the lab's ``warmup`` key on a ``post`` model.
``stream_changes`` measures how much each block moves the residual stream, ``|x_out - x_in| / |x_in|``: for
pre-LN this is the relative update ``|f(x)| / |x|`` whose decay with depth Liu et al. (2020, "Admin") read as
the deeper blocks of a pre-LN stack contributing less.

The model reads token ids (B, T) with causal self-attention and predicts from the last position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from gradmedic._errors import bad_argument
from gradmedic.probes import BackwardSignalProbe

__all__ = ["VARIANTS", "StreamRecord", "TransformerSpec", "build_transformer", "layerscale_eps", "stream_changes"]

VARIANTS = ("post", "pre", "rezero", "deepnorm", "layerscale")
_PRE_NORM = ("pre", "layerscale")  # layouts whose branches read LN(x) and whose stack ends in a final LN


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


def layerscale_eps(depth: int) -> float:
    """LayerScale's initial gain at ``depth`` blocks, CaiT's rule (Touvron et al. 2021, sec. 3.1): 0.1 up to 18
    blocks, 1e-5 at 24, 1e-6 deeper. Between 18 and 24 (not in the paper) the 24-block value is used."""
    return 0.1 if depth <= 18 else 1e-5 if depth <= 24 else 1e-6


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
        if spec.variant == "layerscale":
            eps = layerscale_eps(spec.depth)
            self.gamma1 = nn.Parameter(torch.full((spec.width,), eps))
            self.gamma2 = nn.Parameter(torch.full((spec.width,), eps))
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
        if self.variant == "layerscale":
            x = x + self.gamma1 * self.attention(self.norm1(x))
            return x + self.gamma2 * self.ff(self.norm2(x))
        if self.variant == "rezero":
            x = x + self.alpha * self.attention(x)
            return x + self.alpha * self.ff(x)
        x = self.norm1(self.a * x + self.attention(x))  # post (a = 1) and deepnorm
        return self.norm2(self.a * x + self.ff(x))


class TransformerLM(nn.Module):
    """Token + position embeddings -> blocks -> [final LN for pre-LN and LayerScale] -> a head on the last
    position."""

    def __init__(self, spec: TransformerSpec):
        super().__init__()
        self.embed = nn.Embedding(spec.vocab, spec.width)
        self.position = nn.Embedding(spec.max_len, spec.width)
        self.blocks = nn.ModuleList(_Block(spec) for _ in range(spec.depth))
        self.norm = nn.LayerNorm(spec.width) if spec.variant in _PRE_NORM else nn.Identity()
        self.head = nn.Linear(spec.width, spec.d_out)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) int64
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.embed(tokens) + self.position(positions)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h)[:, -1])

    def stream(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """The residual stream: the embeddings, then each block's output."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        states = [self.embed(tokens) + self.position(positions)]
        for block in self.blocks:
            states.append(block(states[-1]))
        return states


def stream_changes(model: nn.Module, tokens: torch.Tensor) -> list[float]:
    """Per block, ``|x_out - x_in| / |x_in|`` over the whole batch (Frobenius norms), without gradients and in
    eval mode (restored). For pre-LN and LayerScale it is the block's relative update ``|f(x)| / |x|``; for
    ReZero ``|alpha f(x)| / |x|``; for post-LN and DeepNorm the change includes the renormalisation."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            states = model.stream(tokens)
    finally:
        model.train(was_training)
    return [float((b - a).norm() / a.norm().clamp_min(1e-30)) for a, b in zip(states, states[1:], strict=False)]


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


def _ratio(values: list[float | None]) -> float | None:
    if len(values) < 2 or values[0] is None or not values[-1]:
        return None
    return values[0] / values[-1]


class StreamRecord:
    """What a lab run records of a transformer's residual stream, beside the per-layer profile every run has.

    - the gradient reaching each block's output, RMS of dL/d(block output), at the first and the last recorded
      step: the quantity ``gm.check``'s vanishing/exploding rules read along a residual stream, taken by the same
      probe (``BackwardSignalProbe``), with the first block over the last as ``ratio_init``/``ratio_trained``;
    - ``stream_changes`` at init and after training, on the same tokens.

    Made before training (it reads the changes at init); ``probes`` go into the run's Monitor."""

    def __init__(self, model: nn.Module, tokens: torch.Tensor):
        self.model, self.tokens = model, tokens
        self.changes_init = stream_changes(model, tokens)

    @staticmethod
    def probes(every: int) -> list[BackwardSignalProbe]:
        return [BackwardSignalProbe(every=every)]

    def result(self, trace: Any) -> dict[str, Any]:
        blocks = [f"blocks.{i}" for i in range(len(self.model.blocks))]
        out: dict[str, Any] = {"blocks": len(blocks), "changes_init": self.changes_init,
                               "changes_trained": stream_changes(self.model, self.tokens)}
        column = {name: j for j, name in enumerate(trace.layers)}
        if "backward_rms" not in trace.metrics or not all(b in column for b in blocks):
            return {**out, "steps": [], "init": [], "trained": [], "ratio_init": None, "ratio_trained": None}
        values = trace.metric("backward_rms")[:, [column[b] for b in blocks]]
        rows = np.flatnonzero(~np.all(np.isnan(values), axis=1))
        first, last = ([None if not np.isfinite(v) else float(v) for v in values[r]] for r in (rows[0], rows[-1]))
        return {**out, "steps": [int(trace.steps[rows[0]]), int(trace.steps[rows[-1]])], "init": first,
                "trained": last, "ratio_init": _ratio(first), "ratio_trained": _ratio(last)}
