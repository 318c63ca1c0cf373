"""Finding the tensor that matters in whatever a module or model returns."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import torch

__all__ = ["first_float_tensor", "float_tensors", "sum_of_squares"]


def float_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every floating-point tensor in a tensor, tuple, list, dict or dataclass, depth first."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield obj
        return
    if isinstance(obj, Mapping):
        items: Any = obj.values()
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = (getattr(obj, f.name) for f in dataclasses.fields(obj))
    elif isinstance(obj, (tuple, list)):
        items = obj
    else:
        return
    for item in items:
        yield from float_tensors(item)


def first_float_tensor(obj: Any, prefer_loss: bool = False) -> torch.Tensor | None:
    """The first floating-point tensor in a tensor, tuple, list, dict or dataclass (depth first).

    Hugging Face models return dict-like dataclasses whose first entry may be ``loss``; with
    ``prefer_loss`` a ``.loss``/``["loss"]`` tensor wins over the rest. Called in every forward hook: a tensor,
    or a tuple that starts with one (a module's arguments), is answered without the general walk.
    """
    if isinstance(obj, torch.Tensor):
        return obj if obj.is_floating_point() else None
    if not prefer_loss and isinstance(obj, tuple) and obj and isinstance(obj[0], torch.Tensor) \
            and obj[0].is_floating_point():
        return obj[0]
    if prefer_loss:
        loss = obj.get("loss") if isinstance(obj, Mapping) else getattr(obj, "loss", None)
        if isinstance(loss, torch.Tensor) and loss.is_floating_point():
            return loss
    return next(float_tensors(obj), None)


def sum_of_squares(t: torch.Tensor) -> torch.Tensor:
    """sum(t**2) as a 0-d tensor, at least float32, without reading ``t`` twice.

    A BLAS dot of a contiguous tensor with itself is 2-2.5x faster on a CPU than
    ``linalg.vector_norm`` (35 us against 87 us on a 64x16x28x28 map); it accumulates in the tensor's
    precision (float32: ~1e-5 relative), which is plenty for a statistic.
    """
    if t.requires_grad:  # a forward output; a gradient in a backward hook has no graph (one dispatch fewer)
        t = t.detach()
    if t.dtype.itemsize < 4:
        t = t.float()
    if t.is_cpu and t.is_contiguous():
        flat = t.view(-1)
        return torch.dot(flat, flat)
    return torch.linalg.vector_norm(t).square()
