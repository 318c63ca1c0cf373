"""The modules of QK-norm (``qk_norm.py`` puts them in a model): ``QKNorm``, the norm of each head's queries or keys;
``FusedQKNorm``, the same inside a fused q|k|v projection's output; ``QKNormMultiheadAttention``.

``nn.MultiheadAttention`` computes q, k and v inside one fused function (``F.multi_head_attention_forward``, or a
native kernel on its fast path) that leaves no place for a norm, so ``qk_norm_`` turns an existing module into
``QKNormMultiheadAttention`` (its class swapped, its parameters and their state_dict keys kept, ``q_norm``/``k_norm``
added), whose forward is torch's slow path written out with the norms applied to the projected queries and keys,
per head, before the dot product."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gradmedic._errors import bad_argument

__all__ = ["EPS", "NORMS", "FusedQKNorm", "QKNorm", "QKNormMultiheadAttention"]

NORMS = ("rms", "layer")
# RMSNorm's eps as Llama's (1e-6): far below the squared RMS of any query a trained model makes
EPS = 1e-6


class QKNorm(nn.Module):
    """RMSNorm (``norm="rms"``) or LayerNorm (``"layer"``) of each ``head_dim``-wide slice of the last axis, with a
    learnable gain: ``weight`` of shape ``(head_dim,)`` shared by the heads (``heads=None``), or ``(heads,
    head_dim)``, one per head. Computed in float32, returned in the input's dtype. Input ``(..., n * head_dim)``:
    ``n`` heads side by side (a projection's output) or one (``(..., head_dim)``, after the heads were split)."""

    def __init__(self, head_dim: int, heads: int | None = None, norm: str = "rms", eps: float = EPS,
                 device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        if norm not in NORMS:
            raise bad_argument("norm", f"one of {NORMS}", norm)
        self.head_dim, self.heads, self.norm, self.eps = head_dim, heads, norm, eps
        shape = (head_dim,) if heads is None else (heads, head_dim)
        self.weight = nn.Parameter(torch.ones(shape, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype)) if norm == "layer" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float().unflatten(-1, (-1, self.head_dim))  # (..., n, head_dim)
        if self.norm == "layer":
            y = y - y.mean(-1, keepdim=True)
        y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + self.eps) * self.weight.float()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.flatten(-2).to(x.dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, heads={self.heads}, norm={self.norm!r}, eps={self.eps}"


class FusedQKNorm(nn.Module):
    """QK-norm inside a fused projection's output: ``parts`` names its slices (``("q", "k", "v")``, ``("k", "v")``),
    laid out as ``"blocks"`` ([q | k | v], GPT-2's ``c_attn``) or ``"heads"`` (per head [q k v], GPT-NeoX, BLOOM);
    the q and k slices pass through the ``q``/``k`` children, the rest as they are."""

    def __init__(self, layout: str, parts: tuple[str, ...], heads: int, head_dim: int, norm: str = "rms",
                 eps: float = EPS, device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.layout, self.parts, self.heads, self.head_dim = layout, parts, heads, head_dim
        for part in ("q", "k"):
            if part in parts:
                self.add_module(part, QKNorm(head_dim, heads, norm, eps, device, dtype))

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The parts of ``x``, each ``(..., heads * head_dim)``."""
        if self.layout == "blocks":
            return list(x.split(self.heads * self.head_dim, -1))
        y = x.unflatten(-1, (self.heads, len(self.parts), self.head_dim))
        return [y[..., i, :].flatten(-2) for i in range(len(self.parts))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pieces = [getattr(self, p)(t) if p in ("q", "k") else t for p, t in zip(self.parts, self.split(x), strict=True)]
        if self.layout == "blocks":
            return torch.cat(pieces, -1)
        return torch.stack([t.unflatten(-1, (self.heads, self.head_dim)) for t in pieces], -2).flatten(-3)


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True: not allowed) as an additive float one, as torch reads it."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


class QKNormMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose queries and keys pass through ``q_norm``/``k_norm`` (a ``QKNorm`` per head)
    after their projection. Same arguments and return values as torch's; it never takes torch's fused fast path
    (which reads ``in_proj_weight`` directly and would skip the norms), so inference runs the slow path. A
    ``bias_k`` (``add_bias_kv=True``) is normalised with the keys; the zero key of ``add_zero_attn`` stays zero."""

    q_norm: nn.Module
    k_norm: nn.Module

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        if not batched:  # (L, E): a batch of one
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, length, width = query.shape
        heads, head_dim = self.num_heads, self.head_dim
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)  # (N, L|S, E)
        dtype = q.dtype
        attn_mask, key_padding_mask = _float_mask(attn_mask, dtype), _float_mask(key_padding_mask, dtype)
        if self.bias_k is not None and self.bias_v is not None:  # one more key and value, learned
            k = torch.cat([k, self.bias_k.transpose(0, 1).expand(n, 1, width).to(dtype)], 1)
            v = torch.cat([v, self.bias_v.transpose(0, 1).expand(n, 1, width).to(dtype)], 1)
            attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
            key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
        q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(n, length, heads, head_dim).transpose(1, 2)  # (N, h, L, d)
        k = k.view(n, k.shape[1], heads, head_dim).transpose(1, 2)  # (N, h, S, d)
        v = v.view(n, v.shape[1], heads, head_dim).transpose(1, 2)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(n, heads, 1, head_dim)], 2)
            v = torch.cat([v, v.new_zeros(n, heads, 1, head_dim)], 2)
            attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
            key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
        size = k.shape[2]
        mask = None
        if attn_mask is not None:  # (L, S) or (N * h, L, S)
            mask = attn_mask.view(n if attn_mask.dim() == 3 else 1, heads if attn_mask.dim() == 3 else 1, length, size)
        elif is_causal:
            mask = torch.full((length, size), float("-inf"), dtype=dtype, device=q.device).triu(1)[None, None]
        if key_padding_mask is not None:  # (N, S)
            padding = key_padding_mask.view(n, 1, 1, size)
            mask = padding if mask is None else mask + padding
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * (1.0 / math.sqrt(head_dim))) @ k.transpose(-2, -1)  # (N, h, L, S)
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(-1)
            if dropout > 0:
                weights = F.dropout(weights, p=dropout)
            out = weights @ v
            if average_attn_weights:
                weights = weights.mean(1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = F.linear(out.transpose(1, 2).reshape(n, length, width), self.out_proj.weight, self.out_proj.bias)
        if not batched:
            return out.squeeze(0), (weights.squeeze(0) if weights is not None else None)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights
