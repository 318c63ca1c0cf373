"""Weight decay on the weight matrices only: two optimizer param groups.

Decoupled weight decay (AdamW, Loshchilov & Hutter 2019) on the weight matrices, convolution kernels and the output
head keeps their norms (and so the output logits, Wortsman et al. 2023 sec. 3.2) from growing; on biases,
normalisation gains and embeddings it only pulls them toward 0, which nothing asks for: a LayerNorm gain decayed
to 0 switches its channel off, and an embedding row is decayed at every step though it gets a gradient only when
its token is in the batch. The common recipe (GPT-2/3, nanoGPT, the Hugging Face Trainer) leaves biases and norms
out; this one leaves embeddings out too.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from gradmedic._errors import bad_argument
from gradmedic.architecture import is_norm, role_of

__all__ = ["WEIGHT_DECAY", "decay_groups"]

# The decay of GPT-3 (Brown et al. 2020), Llama (Touvron et al. 2023) and most LLM recipes with AdamW
WEIGHT_DECAY = 0.1


def _kept_out(model: nn.Module) -> set[int]:
    """The parameters no decay should touch: of norms and embeddings, and every tensor under 2 dimensions."""
    out: set[int] = set()
    for name, module in model.named_modules():
        whole = is_norm(module) or isinstance(module, nn.Embedding) or role_of(name, module) == "embedding"
        for p in module.parameters(recurse=False):
            if whole or p.dim() < 2:
                out.add(id(p))
    return out


def decay_groups(model: nn.Module | Iterable[torch.Tensor], weight_decay: float = WEIGHT_DECAY) -> list[dict[str, Any]]:
    """Param groups for a ``torch.optim`` optimizer: ``weight_decay`` on the weight matrices and kernels, 0 on
    biases, normalisation layers and embeddings (every parameter of them) and every other tensor of fewer than 2
    dimensions. From a module the norms and embeddings are known by their module; from tensors alone, by their
    dimensions only (an embedding matrix is then decayed). Parameters that do not require a gradient are left
    out; empty groups too.

    >>> optimizer = torch.optim.AdamW(decay_groups(model, 0.1), lr=3e-4)
    """
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise bad_argument("weight_decay", "a non-negative float", weight_decay)
    if isinstance(model, nn.Module):
        params, kept_out = list(model.parameters()), _kept_out(model)
    else:
        params = [model] if isinstance(model, torch.Tensor) else list(model)
        if any(isinstance(p, dict) for p in params):
            raise bad_argument("model", "a module or an iterable of tensors (not param groups)", params[0])
        kept_out = {id(p) for p in params if p.dim() < 2}
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if id(p) not in kept_out]
    rest = [p for p in params if id(p) in kept_out]
    groups = [{"params": decay, "weight_decay": float(weight_decay)}, {"params": rest, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
