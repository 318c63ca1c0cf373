"""Model surgery: swap activations, insert normalisation, add residual connections (with ReZero).

Each returns a changed copy (``inplace=True`` changes the model itself). Modules are replaced in their
parent, so the surgery works on any model, not only on ``nn.Sequential``; functional activations
(``F.sigmoid`` inside a ``forward``) cannot be swapped and are left alone.

- ``swap_activation``: Glorot & Bengio (2010) on saturating units; He et al. (2015) on rectifiers.
- ``add_normalization``: Ioffe & Szegedy (2015) BatchNorm, Ba et al. (2016) LayerNorm, after each
  Linear/Conv layer that feeds an activation (the output layer is left alone).
- ``add_residual``: He et al. (2016) identity shortcuts around same-shape blocks of a Sequential, with an
  optional ReZero scale (Bachlechner et al. 2020): ``y = x + alpha * f(x)``, alpha a parameter at 0, so
  every block starts as the identity and the gradient reaches the first layer undiminished.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from gradmedic._errors import GradmedicError, bad_argument
from gradmedic._inputs import forward_with_hooks
from gradmedic.architecture import SATURATING_TYPES
from gradmedic.remedies.init import following_activations

__all__ = ["ACTIVATIONS", "LayerScale", "Residual", "add_normalization", "add_residual", "swap_activation"]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "gelu": nn.GELU, "silu": nn.SiLU, "elu": nn.ELU,
    "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
}


def _target(model: nn.Module, inplace: bool) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise bad_argument("model", "a torch.nn.Module", model)
    return model if inplace else copy.deepcopy(model)


def replace_module(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is a child (slots collected first: ``new`` may contain ``old``)."""
    slots = [(parent, name) for parent in root.modules() for name, child in parent.named_children() if child is old]
    for parent, name in slots:
        setattr(parent, name, new)


def swap_activation(model: nn.Module, to: str = "relu", replace: tuple[type[nn.Module], ...] = SATURATING_TYPES,
                    inplace: bool = False) -> nn.Module:
    """Replace every activation module of the types in ``replace`` with a fresh ``to`` activation."""
    if to not in ACTIVATIONS:
        raise bad_argument("to", f"one of {sorted(ACTIVATIONS)}", to)
    model = _target(model, inplace)
    found = [m for m in model.modules() if isinstance(m, replace)]
    if not found:
        raise GradmedicError(f"swap_activation found no {', '.join(t.__name__ for t in replace)} module to "
                             "replace; functional activations in forward() cannot be swapped.")
    for old in found:
        replace_module(model, old, ACTIVATIONS[to]())
    return model


def _norm_for(layer: nn.Module, kind: str) -> nn.Module:
    if isinstance(layer, nn.modules.conv._ConvNd):
        channels = layer.out_channels
        if kind == "layer":
            return nn.GroupNorm(1, channels)  # LayerNorm over (C, H, W) for conv maps
        dims = len(layer.kernel_size)
        return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](channels)
    features = layer.out_features
    return nn.BatchNorm1d(features) if kind == "batch" else nn.LayerNorm(features)


def add_normalization(model: nn.Module, kind: str = "batch", inputs: Any = None, inplace: bool = False) -> nn.Module:
    """After each Linear/Conv layer that feeds an activation, insert BatchNorm (``"batch"``) or LayerNorm
    (``"layer"``; GroupNorm(1, C) for conv maps). A layer becomes ``Sequential(layer, norm)``."""
    if kind not in ("batch", "layer"):
        raise bad_argument("kind", '"batch" or "layer"', kind)
    model = _target(model, inplace)
    follows = following_activations(model, inputs)
    targets = [layer for layer, act in follows.items() if act is not None]
    if not targets:
        raise GradmedicError("add_normalization found no Linear/Conv layer followed by an activation module.")
    for layer in targets:
        norm = _norm_for(layer, kind)
        weight = next(layer.parameters())
        replace_module(model, layer, nn.Sequential(layer, norm.to(weight.device, weight.dtype)))
    return model


class Residual(nn.Module):
    """``y = x + alpha * branch(x)``; alpha a learnable scalar starting at 0 (ReZero) or a fixed 1."""

    def __init__(self, branch: nn.Module, rezero: bool = True):
        super().__init__()
        self.branch = branch
        self.rezero = rezero
        if rezero:
            self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch(x)
        return x + (self.alpha * out if self.rezero else out)


class LayerScale(nn.Module):
    """``y = gamma * x`` with gamma a per-channel vector on the last axis (Touvron et al. 2021, CaiT),
    put at the end of a residual branch. ``init=1`` is the identity (safe on trained weights); a small
    ``init`` makes a fresh deep block start close to the identity. ``learnable=False`` keeps it fixed (the
    DeepNorm residual weighting, Wang et al. 2022)."""

    def __init__(self, channels: int, init: float = 1.0, learnable: bool = True):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((channels,), float(init)), requires_grad=learnable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C)
        return x * self.gamma


def _units(seq: nn.Sequential) -> list[list[int]]:
    """Split a Sequential's children into units that each start at a weighted layer."""
    units: list[list[int]] = []
    for i, child in enumerate(seq):
        head = child[0] if isinstance(child, nn.Sequential) and len(child) else child
        weighted = isinstance(head, (nn.Linear, nn.modules.conv._ConvNd))
        if weighted or not units:
            units.append([i])
        else:
            units[-1].append(i)
    return units


def add_residual(model: nn.Sequential, inputs: Any = None, rezero: bool = True, units_per_block: int = 1,
                 inplace: bool = False) -> nn.Sequential:
    """Wrap same-shape blocks of a Sequential (``units_per_block`` layer+activation units each) in
    ``Residual``. Shapes come from one forward pass on ``inputs``; without inputs only Linear layers with
    equal in/out features count as same-shape. The first and last units are never wrapped."""
    if not isinstance(model, nn.Sequential):
        raise bad_argument("model", "an nn.Sequential (residual blocks are formed from its children)", model)
    if not isinstance(units_per_block, int) or units_per_block < 1:
        raise bad_argument("units_per_block", "a positive int", units_per_block)
    model = _target(model, inplace)
    units = _units(model)
    shapes: dict[int, tuple[Any, Any]] = {}
    if inputs is not None:
        index = {id(child): i for i, child in enumerate(model)}
        forward_with_hooks(model, inputs, list(model),
                           lambda mod, a, o: shapes.__setitem__(index[id(mod)], (tuple(a[0].shape), tuple(o.shape))))

    def same_shape(block: list[int]) -> bool:
        first, last = block[0], block[-1]
        if inputs is not None:
            return first in shapes and last in shapes and shapes[first][0] == shapes[last][1]
        head = model[first][0] if isinstance(model[first], nn.Sequential) else model[first]
        tail = [m for i in block for m in model[i].modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
        return isinstance(head, nn.Linear) and all(isinstance(t, nn.Linear) for t in tail) and \
            head.in_features == tail[-1].out_features

    inner = units[1:-1]
    blocks = [sum(inner[i:i + units_per_block], []) for i in range(0, len(inner), units_per_block)]
    wrap = [b for b in blocks if same_shape(b)]
    if not wrap:
        raise GradmedicError("add_residual found no same-shape block to wrap; pass inputs so shapes can be "
                             "measured, or the model has no block whose output shape equals its input's.")
    children = list(model)
    start_of = {b[0]: b for b in wrap}
    rebuilt: list[nn.Module] = []
    i = 0
    while i < len(children):
        if i in start_of:
            block = start_of[i]
            rebuilt.append(Residual(nn.Sequential(*(children[j] for j in block)), rezero=rezero))
            i = block[-1] + 1
        else:
            rebuilt.append(children[i])
            i += 1
    for name in list(model._modules):
        del model._modules[name]
    for k, child in enumerate(rebuilt):
        model.add_module(str(k), child)
    weight = next(model.parameters())
    return model.to(weight.device)
