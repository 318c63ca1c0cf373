"""Gradient accumulation with the loss normalised over the whole accumulated batch.

The common mistake is to average each micro-batch's loss and then divide by the number of
micro-batches: with an uneven last micro-batch (or a varying number of real tokens per micro-batch)
that weights some samples more than others. Here each micro-batch's mean loss is weighted by its share
of the samples (or non-ignored tokens) of all micro-batches, so the accumulated gradient equals the
large-batch gradient exactly.

A claim sometimes made is that accumulation helps vanishing gradients: it does not change any layer's
gradient relative to another's (the lab measures it); it only makes a large batch fit in memory.
BatchNorm sees each micro-batch separately, so its statistics (and the gradients) differ from the large
batch's; a warning says so.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from gradmedic._errors import GradmedicWarning, bad_argument
from gradmedic._inputs import run_forward

__all__ = ["accumulate"]


def _count(targets: Any, unit: str, ignore_index: int | None) -> int:
    if not isinstance(targets, torch.Tensor):
        raise bad_argument("targets", "a tensor per micro-batch", targets)
    if unit == "samples":
        return int(targets.shape[0])
    mask = targets != ignore_index if ignore_index is not None else torch.ones_like(targets, dtype=torch.bool)
    return int(mask.sum())


def accumulate(model: nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor],
               micro_batches: Iterable[tuple[Any, torch.Tensor]], unit: str = "samples",
               ignore_index: int | None = None) -> torch.Tensor:
    """Backward over every micro-batch so that the gradients equal those of one large batch.

    ``loss_fn(outputs, targets)`` must return the *mean* over the micro-batch's samples (``unit="samples"``)
    or over its non-ignored tokens (``unit="tokens"``, with ``ignore_index`` as in cross-entropy).
    Gradients are added to what ``.grad`` holds (zero them first, as for any backward). Returns the loss of
    the whole accumulated batch (detached).
    """
    if unit not in ("samples", "tokens"):
        raise bad_argument("unit", '"samples" or "tokens"', unit)
    batches = list(micro_batches)
    if not batches:
        raise bad_argument("micro_batches", "a non-empty iterable of (inputs, targets)", batches)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        warnings.warn("gradmedic.accumulate: the model has BatchNorm, whose statistics are computed per "
                      "micro-batch, so the gradients differ from the large batch's; use GroupNorm/LayerNorm or "
                      "larger micro-batches if that matters.", GradmedicWarning, stacklevel=2)
    counts = [_count(t, unit, ignore_index) for _, t in batches]
    total = sum(counts)
    if total == 0:
        raise bad_argument("micro_batches", "at least one sample or non-ignored token", total)
    loss_sum = torch.zeros(())
    for (inputs, targets), n in zip(batches, counts, strict=True):
        if n == 0:
            continue
        loss = loss_fn(run_forward(model, inputs), targets) * (n / total)
        loss.backward()
        loss_sum = loss_sum + loss.detach().to(loss_sum.device, torch.float64 if loss.dtype == torch.float64
                                                else torch.float32)
    return loss_sum
