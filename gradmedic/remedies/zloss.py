"""z-loss: ``coef * (log Z)^2`` added to the loss, ``log Z = logsumexp(logits)`` the output softmax's log partition.

Cross-entropy is unchanged when every logit moves by the same amount, so nothing stops the logits from drifting up
together until the softmax no longer resolves them (in bfloat16/float16 first) and the run diverges. The z-loss pins
log Z near 0 (PaLM, Chowdhery et al. 2022, with ``coef = 1e-4``; Wortsman et al. 2023 sec. 3.2: it removes the
output-logit divergence). Its gradient with respect to the logits is ``2 coef log Z softmax(logits)`` per row
(divided by the rows averaged over).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from gradmedic._errors import GradmedicError, bad_argument
from gradmedic._inputs import describe, loss_of

__all__ = ["Z_LOSS_COEF", "ZLoss", "z_loss"]

# PaLM's coefficient (Chowdhery et al. 2022, sec. 5); Wortsman et al. 2023 use the same
Z_LOSS_COEF = 1e-4


def z_loss(logits: torch.Tensor, coef: float = Z_LOSS_COEF, mask: torch.Tensor | None = None,
           dim: int = -1) -> torch.Tensor:
    """``coef * mean((logsumexp(logits, dim))^2)`` over the rows (every position but ``dim``), in float32 (float64
    stays float64); ``mask`` (the rows' shape, True/1 where a row counts) averages over the rows it keeps."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise bad_argument("logits", "a floating-point tensor", logits)
    if isinstance(coef, bool) or not isinstance(coef, (int, float)) or coef < 0:
        raise bad_argument("coef", "a non-negative float", coef)
    x = logits if logits.dtype == torch.float64 else logits.float()
    squared = torch.logsumexp(x, dim=dim).square()
    if mask is None:
        return coef * squared.mean()
    if mask.shape != squared.shape:
        raise bad_argument("mask", f"a tensor of the rows' shape {tuple(squared.shape)}", mask)
    weight = mask.to(squared.dtype)
    return coef * (squared * weight).sum() / weight.sum().clamp_min(1)


def logits_of(outputs: Any) -> torch.Tensor:
    """The logits in a model's outputs: the tensor itself, ``.logits`` / ``["logits"]`` (Hugging Face), or the
    first element of a tuple."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    found = getattr(outputs, "logits", None)
    if found is None and isinstance(outputs, Mapping):
        found = outputs.get("logits")
    if found is None and isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        found = outputs[0]
    if not isinstance(found, torch.Tensor):
        raise GradmedicError(f"ZLoss found no logits in the outputs ({describe(outputs)}): return a tensor, or an "
                             "object or dict with .logits")
    return found


class ZLoss(nn.Module):
    """``loss_fn(outputs, targets) + z_loss(logits)``: a loss function with the z-loss added.

    ``loss_fn``: the loss as it was (``F.cross_entropy``, an ``nn.CrossEntropyLoss``, ...); None takes the outputs'
    own ``.loss`` (a Hugging Face model given labels) or cross-entropy/MSE against ``targets``, as gradmedic's check
    does. The logits are the outputs (or their ``.logits``); positions whose integer target is ``ignore_index``
    (when the targets have the logits' shape without the class axis) do not count.

    >>> loss_fn = ZLoss(nn.functional.cross_entropy, coef=1e-4)
    >>> loss = loss_fn(model(x), y)
    """

    def __init__(self, loss_fn: Callable[[Any, Any], torch.Tensor] | None = None, coef: float = Z_LOSS_COEF,
                 ignore_index: int | None = -100, dim: int = -1):
        super().__init__()
        if loss_fn is not None and not callable(loss_fn):
            raise bad_argument("loss_fn", "None or a callable (outputs, targets) -> loss", loss_fn)
        if isinstance(coef, bool) or not isinstance(coef, (int, float)) or coef < 0:
            raise bad_argument("coef", "a non-negative float", coef)
        self.loss_fn, self.coef, self.ignore_index, self.dim = loss_fn, float(coef), ignore_index, dim
        self.base: torch.Tensor | None = None  # the last call's loss without the z-loss (detached): runs compare it

    def forward(self, outputs: Any, targets: Any = None) -> torch.Tensor:
        base = loss_of(outputs, targets, self.loss_fn)[0]
        self.base = base.detach()
        logits = logits_of(outputs)
        mask = None
        rows = logits.shape[:self.dim % logits.dim()] + logits.shape[self.dim % logits.dim() + 1:]
        if isinstance(targets, torch.Tensor) and not targets.is_floating_point() and targets.shape == rows and \
                self.ignore_index is not None:
            mask = targets != self.ignore_index
        return base + z_loss(logits, self.coef, mask, self.dim).to(base.dtype)

    def extra_repr(self) -> str:
        return f"coef={self.coef:g}"
