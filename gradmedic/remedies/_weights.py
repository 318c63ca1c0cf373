"""Writing a layer's weight when it may be a parametrization (``torch.nn.utils.parametrizations.weight_norm``,
``spectral_norm``).

Such a layer's ``weight`` is computed from ``parametrizations.weight.original`` (weight norm: ``original0``, the
magnitude, and ``original1``, the direction) at every use: an init written into it changes a temporary and
nothing else, so a remedy would silently do nothing. ``writable_weight`` hands out a copy to write into and
assigns it back through the parametrization (its ``right_inverse``: weight norm stores the new magnitude and
direction). A value the parametrization cannot hold (an all-zero weight under weight norm is 0/0) is refused with
a clear error and the layer is left as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from gradmedic._errors import GradmedicError

__all__ = ["is_parametrized", "writable_weight"]


def is_parametrized(module: nn.Module) -> bool:
    """Whether ``module.weight`` is computed by a parametrization."""
    return parametrize.is_parametrized(module, "weight")


@contextlib.contextmanager
def writable_weight(module: nn.Module) -> Iterator[torch.Tensor]:
    """``module.weight`` to write into in place (under ``torch.no_grad`` or with ``nn.init``); for a parametrized
    weight, a copy that is assigned back on exit."""
    if not is_parametrized(module):
        yield module.weight
        return
    originals = {name: p.detach().clone() for name, p in module.parametrizations.weight.named_parameters()}
    weight = module.weight.detach().clone()
    yield weight
    with torch.no_grad():
        module.weight = weight
        if torch.isfinite(module.weight).all():
            return
        for name, p in module.parametrizations.weight.named_parameters():
            p.copy_(originals[name])
    raise GradmedicError(f"The new weight of this {type(module).__bases__[0].__name__} cannot be stored through its "
                         f"parametrization ({', '.join(type(m).__name__ for m in module.parametrizations.weight)}): it "
                         "reads as NaN/Inf (an all-zero weight under weight norm is 0/0). The layer is unchanged; "
                         "remove the parametrization first, or use another remedy.")
